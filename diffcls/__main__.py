"""`python -m diffcls ...` is the `diffcls` command."""

from diffcls.cli.app import main

main()
