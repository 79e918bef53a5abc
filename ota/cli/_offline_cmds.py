"""``ota offline export``: signed, expiring update media for sites with no route to the
repository (ADR 0013). Parses, calls :func:`ota.repository._offline.export`, prints.

The device side is ``ota device update --from`` and ``ota device report --to``; the fleet side
is ``ota fleet import``.
"""

from __future__ import annotations

from pathlib import Path

import click

from ota._extras import require
from ota.cli._output import emit, json_option, project_option


@click.group()
def offline() -> None:
    """Offline update media (USB sticks, air-gapped sites)."""


@offline.command("export")
@click.argument("args", nargs=-1, required=True, metavar="NAME[@VERSION]... DEST")
@project_option
@click.option("--expires-in", "days", type=click.FloatRange(0.001, 3650.0), default=14.0,
              show_default=True, help="Days until devices refuse the medium.")  # fmt: skip
@click.option(
    "--device-class",
    default=None,
    help="Hardware tier the medium is for; devices of another tier refuse it.",
)
@click.option(
    "--have",
    multiple=True,
    metavar="NAME@VERSION",
    help="A delta medium: leave out the chunks of this release (what devices run).",
)
@click.option(
    "--archive/--folder",
    default=None,
    help="Write one tar file (default: when DEST ends in .tar) or a folder.",
)
@json_option
def export_cmd(args: tuple[str, ...], project_dir: str, days: float, device_class: str | None,
               have: tuple[str, ...], archive: bool | None, as_json: bool) -> None:  # fmt: skip
    """Write a medium carrying NAME[@VERSION]... (newest live release by default) to DEST.

    The medium holds the TUF metadata that verifies those releases, exactly the chunks they
    need, and its own timestamp and snapshot (online key) expiring in --expires-in days.
    Refused (exit 3) when a role the devices consult would expire before the medium.
    """
    require("repository", "`ota offline export`")
    from ota.repository import Project
    from ota.repository._offline import export

    if len(args) < 2:
        raise click.UsageError("give at least one NAME[@VERSION] and the destination")
    *wanted, dest = args
    result = export(Project.open(Path(project_dir)), wanted, Path(dest), expires_in_days=days,
                    device_class=device_class, have=have, archive=archive)  # fmt: skip
    emit(result.to_dict(), as_json, lambda: (
        f"medium {result.dest}: " + ", ".join(f"{n} {v}" for n, v in result.releases.items())
        + f"; {result.chunks} chunks ({result.chunks_omitted} left out), {result.bytes} bytes;"
        f" expires {result.expires} (timestamp v{result.timestamp_version})"))  # fmt: skip


def register(group: click.Group) -> None:
    group.add_command(offline)
