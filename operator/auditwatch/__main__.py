"""`python -m auditwatch`: the same as the `auditwatch` command."""

from auditwatch.cli import main

main()
