"""`python -m services.cli` (how services/cluster.py starts every process)."""

from services.cli import main

main()
