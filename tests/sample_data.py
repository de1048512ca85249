"""Where the tests find the real audit samples: tests/data/audit-samples, inside the repository.

The folder's README.md names the public repository and commit each file comes from.
"""

from pathlib import Path

SAMPLES = Path(__file__).resolve().parent / "data" / "audit-samples"
