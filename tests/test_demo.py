"""`auditwatch demo`: the seed story on this machine, end to end (takes about ten seconds)."""

from __future__ import annotations

import re

from auditwatch.demo import run_demo


async def test_demo_fires_for_the_three_unauthorized_reads_then_resolves() -> None:
    lines: list[str] = []
    assert await run_demo(echo=lines.append) == 0, "\n".join(lines)
    output = "\n".join(lines)
    story = [line for line in output.splitlines() if line.startswith("  ALERT ")]
    assert len(story) == 3
    assert all("unauthorized-user" in line and "secrets" in line for line in story)
    notices = re.findall(r"^  (firing|repeat|resolved)\s+count=(\d+)", output, re.MULTILINE)
    assert notices[0] == ("firing", "3")
    assert notices[-1][0] == "resolved"
    assert re.search(r"default\s+secret-read\s+auditdemo\s+Resolved\s+3\s", output)
    assert output.rstrip().endswith("Result: as expected.")
