"""Printing helpers shared by the commands: JSON or human text, progress on stderr."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click


def emit(data: Any, as_json: bool, human: Callable[[], str] | str) -> None:
    """Print ``data`` as JSON, or the human rendering, on stdout."""
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        click.echo(human() if callable(human) else human)


@contextlib.contextmanager
def progress(total: int, label: str, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    """A rich progress bar on stderr (only on a terminal and without --json)."""
    if not enabled or not sys.stderr.isatty() or total <= 0:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TransferSpeedColumn,
    )

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


project_option = click.option(
    "--project",
    "project_dir",
    type=click.Path(file_okay=False, path_type=str),
    default=".",
    envvar="OTA_PROJECT",
    show_default=True,
    help="Folder holding ota.toml.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
