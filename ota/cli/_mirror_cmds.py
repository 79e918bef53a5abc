"""``ota mirror sync SOURCE DEST``: keep a verified site-local mirror of a published repository.

Parses, calls :func:`ota.repository._mirror.sync`, prints. Errors map to exit codes in
``ota.cli._main`` (4: refused source or rollback, 5: source unreachable, 9: storage).
"""

from __future__ import annotations

from pathlib import Path

import click

from ota._extras import require
from ota.cli._output import emit, json_option
from ota.errors import InputError

_MAX_ROOT_BYTES = 512_000


@click.group()
def mirror() -> None:
    """Site-local mirrors of a published repository."""


@mirror.command("sync")
@click.argument("source")
@click.argument("dest")
@click.option("--root", "root_file", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Trusted root.json (the one devices were initialised with).")  # fmt: skip
@click.option("--timeout", type=click.FloatRange(1.0, 600.0), default=30.0, show_default=True,
              help="Read timeout for an HTTP source, in seconds.")  # fmt: skip
@json_option
def sync_cmd(source: str, dest: str, root_file: Path, timeout: float, as_json: bool) -> None:
    """Copy what DEST lacks from SOURCE, verified, metadata last.

    SOURCE is a served repository URL (http/https) or a storage URL / folder; DEST is a
    folder or s3://bucket/prefix. A source older than the mirror, or one that fails
    verification, is refused (exit 4) and the mirror keeps serving its previous state.
    """
    require("repository", "`ota mirror sync`")
    from ota.repository._mirror import open_source, sync
    from ota.repository._storage import open_storage

    try:
        if root_file.stat().st_size > _MAX_ROOT_BYTES:
            raise InputError(f"{root_file} is larger than {_MAX_ROOT_BYTES} bytes")
        trusted_root = root_file.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read the trusted root {root_file}: {e.strerror or e}") from e
    result = sync(open_source(source, timeout=timeout), open_storage(dest), trusted_root)
    doc = result.to_dict()
    emit(doc, as_json, lambda: (
        f"mirror {dest} at timestamp v{result.timestamp_version} "
        f"(snapshot v{result.snapshot_version}, root v{result.root_version}): copied "
        f"{result.copied['blobs']} chunks, {result.copied['targets']} targets, "
        f"{result.copied['metadata']} metadata files ({result.bytes_copied} bytes); "
        f"{sum(result.skipped.values())} already present"))  # fmt: skip


def register(group: click.Group) -> None:
    group.add_command(mirror)
