"""`python -m server serve ...` is `detserve serve ...`."""

from server.cli import main

main()
