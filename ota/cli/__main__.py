"""``python -m ota.cli``."""

from ota.cli import main

main()
