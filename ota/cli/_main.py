"""Entry point and the one place that maps domain errors to exit codes."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="edge-ota")
def cli() -> None:
    """edge-ota: signed, verifiable, reversible model updates for edge fleets."""


def main() -> None:
    cli()
