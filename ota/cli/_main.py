"""Entry point, and the one place that maps domain errors to exit codes (see ``ota.errors``)."""

from __future__ import annotations

import sys
from typing import Any

import click

from ota.errors import ExitCode, OtaError


class _Group(click.Group):
    """A group whose commands turn :class:`OtaError` into a one-line message and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OtaError as e:
            click.echo(f"error: {e.diagnostics()}", err=True)
            ctx.exit(int(e.exit_code))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="edge-ota")
def cli() -> None:
    """edge-ota: signed, verifiable, reversible model updates for edge fleets.

    Exit codes: 0 ok, 2 usage, 3 bad input, 4 refused for security, 5 network or storage
    unreachable (retry), 6 local fault (disk), 7 smoke test failed (reverted), 8 conflict,
    9 configuration, 10 up to date.
    """


def _register() -> None:
    from ota.cli import _device_cmds, _fleet_cmds, _key_cmds, _repo_cmds, _supply_cmds

    for module in (_repo_cmds, _device_cmds, _supply_cmds, _key_cmds, _fleet_cmds):
        module.register(cli)


def main() -> None:
    _register()
    try:
        cli.main(prog_name="ota", standalone_mode=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else ExitCode.INTERNAL)
        sys.exit(code)
