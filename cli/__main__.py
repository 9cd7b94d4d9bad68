"""`python -m cli`: the `loratrain` command."""

from cli.app import main

main()
