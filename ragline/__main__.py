"""``python -m ragline`` runs the command line."""

from .cli import main

main()
