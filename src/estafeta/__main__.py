"""`python -m estafeta` is the `estafeta` command."""

from estafeta.cli import main

main()
