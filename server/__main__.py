"""`python -m detserve.server serve ...` is `detserve serve ...`."""

from detserve.server.cli import main

main()
