"""Entry point, and the one place that maps domain errors to exit codes (see ``ota.errors``)."""

from __future__ import annotations

import gc
import json
import sys
from typing import Any

import click

from ota.errors import (
    ConfigError,
    ConflictError,
    ExitCode,
    InputError,
    LocalError,
    OtaError,
    SecurityError,
    SmokeError,
    TransientError,
)

_FAMILIES: tuple[tuple[type[OtaError], str], ...] = (
    (SecurityError, "security"),
    (TransientError, "transient"),
    (InputError, "input"),
    (ConfigError, "config"),
    (LocalError, "local"),
    (SmokeError, "smoke"),
    (ConflictError, "conflict"),
)


def error_document(e: Exception, exit_code: int) -> dict[str, Any]:
    """The JSON error object printed on stdout under ``--json`` (stable keys: ``error``,
    ``class``, ``kind``, ``exit_code``, ``message``, ``remedy``)."""
    kind = next((k for cls, k in _FAMILIES if isinstance(e, cls)), "internal")
    if isinstance(e, click.UsageError | click.BadParameter):
        kind = "usage"
    message = e.format_message() if isinstance(e, click.ClickException) else str(e)
    return {
        "error": True,
        "class": type(e).__name__,
        "kind": kind,
        "exit_code": exit_code,
        "message": message,
        "remedy": getattr(e, "remedy", "") or "",
    }


class _Group(click.Group):
    """A group whose commands turn :class:`OtaError` into a one-line message and its exit code.

    This is the one place errors are mapped: with ``--json`` the same error is also printed
    on stdout as one JSON object (:func:`error_document`); the human message stays on stderr.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # seen before the subcommand parses it, so its own usage errors come out as JSON too
        ctx.meta["ota.json"] = "--json" in args
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        as_json = bool(ctx.meta.get("ota.json"))
        try:
            return super().invoke(ctx)
        except OtaError as e:
            click.echo(f"error: {e.diagnostics()}", err=True)
            if as_json:
                click.echo(json.dumps(error_document(e, int(e.exit_code)), sort_keys=True))
            ctx.exit(int(e.exit_code))
        except click.ClickException as e:
            if not as_json:
                raise
            e.show()
            click.echo(json.dumps(error_document(e, e.exit_code), sort_keys=True))
            ctx.exit(e.exit_code)
        except ModuleNotFoundError as e:  # a device-only install running a publisher command
            from ota._extras import from_import_error

            missing = from_import_error(e, f"`ota {ctx.invoked_subcommand}`")
            if missing is None:
                raise
            click.echo(f"error: {missing.diagnostics()}", err=True)
            if as_json:
                doc = error_document(missing, int(missing.exit_code))
                click.echo(json.dumps(doc, sort_keys=True))
            ctx.exit(int(missing.exit_code))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="edge-ota")
def cli() -> None:
    """edge-ota: signed, verifiable, reversible model updates for edge fleets.

    Exit codes: 0 ok, 2 usage, 3 bad input, 4 refused for security, 5 network or storage
    unreachable (retry), 6 local fault (disk), 7 smoke test failed (reverted), 8 conflict,
    9 configuration, 10 up to date. With --json, an error is also printed on stdout as
    {"error": true, "class", "kind", "exit_code", "message", "remedy"}.
    """


def _register() -> None:
    from ota.cli import _device_cmds, _fleet_cmds, _key_cmds, _repo_cmds, _supply_cmds

    for module in (_repo_cmds, _device_cmds, _supply_cmds, _key_cmds, _fleet_cmds):
        module.register(cli)
    __import__("ota.cli._mirror_cmds", fromlist=["register"]).register(cli)
    __import__("ota.cli._rollout_cmds", fromlist=["register"]).register(cli)  # issue 9
    __import__("ota.cli._offline_cmds", fromlist=["register"]).register(cli)


def main() -> None:
    _register()
    try:
        cli.main(prog_name="ota", standalone_mode=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else ExitCode.INTERNAL)
        # The command is over: the interpreter's final collections need not walk every object
        # it loaded (issue 13: ~0.05 s of a fresh publish's exit). Only the process ends here.
        gc.freeze()
        sys.exit(code)
