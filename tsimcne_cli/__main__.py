"""`python -m tsimcne_cli`: the same as the `tsimcne` command."""

from tsimcne_cli.main import main

main()
