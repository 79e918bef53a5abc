"""Release manager commands: init, publish, promote, pause, resume, yank, rollback, releases,
gc, serve. Each parses, calls :mod:`ota.repository`, prints."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ota.cli._output import emit, json_option, progress, project_option
from ota.errors import InputError


def _project(project_dir: str):  # type: ignore[no-untyped-def]
    from ota.repository import Project

    return Project.open(Path(project_dir))


def _budgets(values: tuple[str, ...]):  # type: ignore[no-untyped-def]
    """Parse ``TIER:LATENCY_MS:PEAK_MB`` (either figure may be empty)."""
    from ota.bundle import Budget

    out = {}
    for v in values:
        parts = v.split(":")
        if len(parts) != 3:
            raise InputError(
                f"bad --budget {v!r}", remedy="use TIER:LATENCY_MS:PEAK_MB, e.g. npu:25:300"
            )
        tier, lat, mem = parts
        try:
            out[tier] = Budget(float(lat) if lat else None, float(mem) if mem else None)
        except ValueError as e:
            raise InputError(f"bad --budget {v!r}: {e}") from e
    return out


# Cloud SDKs that securesystemslib.signer imports when installed (its KMS signers).
_CLOUD_SDKS = ("boto3", "botocore")


def _lean_publish(ctx: click.Context, _param: click.Parameter, _value: object) -> None:
    """Keep boto3 out of an ``ota publish`` that needs none (issue 13: about 0.2 s of a fresh
    publish's imports on an idle machine, more under load): securesystemslib's signer package
    imports the AWS SDK for its KMS signer when it is installed. When the project's storage is
    not S3 and every signer is a key file (``file:``/``file2:``), the package is imported here,
    before anything else imports it, with the SDK hidden; then unhidden, so any later code may
    import it. Anything unexpected (no readable ota.toml, another signer scheme, S3, the package
    already imported) changes nothing. Runs as the last parameter's callback, so before the
    command (and the policy wrapper around it) imports python-tuf."""
    _quiet_runtime(ctx)
    if "securesystemslib.signer" in sys.modules or any(m in sys.modules for m in _CLOUD_SDKS):
        return
    try:
        import tomllib

        conf = tomllib.loads((Path(str(ctx.params.get("project_dir"))) / "ota.toml").read_text())
        storage = str(conf["repository"]["storage"])
        uris = [str(u) for u in dict(conf.get("signers", {})).values()]
    except (OSError, ValueError, KeyError, TypeError):
        return
    _prestart(ctx, conf, storage)
    if storage.startswith("s3:") or not all(u.startswith(("file:", "file2:")) for u in uris):
        return
    for name in _CLOUD_SDKS:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        import securesystemslib.signer  # noqa: F401 - evaluated now, without the SDK
    finally:
        for name in _CLOUD_SDKS:
            if sys.modules.get(name, False) is None:
                del sys.modules[name]


def _quiet_runtime(ctx: click.Context) -> None:
    """CPU a publish does not need (issue 13; the command is CPU-bound on 2 cores): no cyclic
    garbage collection while it runs (~0.1 s of a fresh publish went to collections during its
    imports; a publish makes few cycles), and one OpenBLAS thread (numpy's BLAS pool, started
    when onnx imports numpy, spun ~0.05 s for nothing: nothing in a publish calls BLAS).
    Both are undone when the command ends, also when its arguments fail to parse after this
    callback ran (click closes the root context then, not the command's)."""
    import gc
    import os

    root = ctx.find_root()
    if gc.isenabled():
        gc.disable()
        root.call_on_close(gc.enable)
    if "numpy" not in sys.modules and "OPENBLAS_NUM_THREADS" not in os.environ:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
        root.call_on_close(lambda: os.environ.pop("OPENBLAS_NUM_THREADS", None))


def _prestart(ctx: click.Context, conf: dict[str, Any], storage: str) -> None:
    """Give the publish of a model file a head start, before python-tuf and the signers are
    imported (issue 13): chunk the file in a child process (``ota.repository._chunkjob``; a
    local repository whose file blob is its only stored form: the defaults), then check the
    model and build its golden session on a thread (``ota.repository._early``). The publish
    adopts each only if it is exactly what it needs, else discards it: a wrong guess here
    costs time, never correctness. What the publish did not adopt (it failed before, or the
    arguments did not parse) is stopped and freed when the command ends, not at exit: a
    long-lived caller (``CliRunner``) keeps no child, temp copy or session."""
    from ota.repository._storage import local_path

    model, max_mb = ctx.params.get("model"), ctx.params.get("max_model_mb")
    if ctx.params.get("kind") == "runtime" or not isinstance(model, Path):
        return
    repo = dict(conf.get("repository", {}))
    root = local_path(storage)  # None: not a local repository
    if (
        repo.get("chunk_blobs", False) is False
        and repo.get("file_blobs", True) is True
        and root is not None
    ):
        from ota.repository._chunkjob import prestart
        from ota.repository._fileblob import local_copy_folder

        if root.is_dir():  # never create folders for a repository that is not there
            from ota.repository._chunkjob import cancel_unadopted

            ctx.find_root().call_on_close(cancel_unadopted)
            prestart(model, local_copy_folder(root))
    if isinstance(max_mb, float | int):
        from ota.repository import _early

        ctx.find_root().call_on_close(lambda: _early.discard(model))
        _early.prestart(model, int(max_mb * 1024 * 1024))


_lean_option = click.option(
    "--lean-imports",
    hidden=True,
    is_flag=True,
    expose_value=False,
    callback=_lean_publish,
)


@click.command()
@click.argument("storage", default="repo")
@project_option
@click.option(
    "--base-url",
    default="http://127.0.0.1:8765",
    show_default=True,
    help="URL devices fetch the repository from (ota serve, a CDN, S3 website).",
)
@click.option(
    "--s3-endpoint",
    envvar="AWS_ENDPOINT_URL",
    default=None,
    help="S3-compatible endpoint (MinIO, Ceph RGW, R2); default: AWS.",
)
@click.option("--bins", default=256, show_default=True, help="Ignored (ADR 0010: self-sizing).")
@click.option("--root-keys", default=1, show_default=True, help="Number of root keys.")
@click.option("--root-threshold", default=1, show_default=True, help="Root signature threshold.")
@click.option(
    "--keys-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Reuse key files from this folder (missing ones are created there).",
)
@click.option(
    "--single-publisher",
    is_flag=True,
    help="Allow a store that ignores conditional writes, on the promise that ONE publisher "
    "host ever writes to it (a host-wide lock serialises that host; see the publish runbook).",
)
@json_option
def init(
    storage: str,
    project_dir: str,
    base_url: str,
    s3_endpoint: str | None,
    bins: int,
    root_keys: int,
    root_threshold: int,
    keys_dir: Path | None,
    single_publisher: bool,
    as_json: bool,
) -> None:
    """Create a repository in STORAGE (a folder, file:// or s3://bucket/prefix)."""
    from ota.repository import init_project

    if "://" not in storage:
        storage = str(Path(storage).resolve())
    result = init_project(
        Path(project_dir),
        storage,
        base_url=base_url,
        s3_endpoint=s3_endpoint,
        bins=bins,
        root_keys=root_keys,
        root_threshold=root_threshold,
        keys_dir=keys_dir,
        single_publisher=single_publisher,
    )
    publishers = "single" if single_publisher else "concurrent"
    note = " (ONE publisher host only; see the publish runbook)" if single_publisher else ""
    emit(
        result.to_dict() | {"publishers": publishers},
        as_json,
        lambda: "\n".join(
            [
                f"repository created in {result.storage}",
                f"  publishers:                        {publishers}{note}",
                f"  trusted root (install on devices): {result.trusted_root}",
                f"  devices fetch from:                {result.base_url}",
                "  metadata layout:                   per-model roles (ADR 0010)",
                "  offline keys (move them off this machine): "
                + ", ".join(result.keys["root"] + result.keys["targets"]),
            ]
        ),
    )


@click.command()
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@project_option
@click.option("--name", required=True, help="Model (or runtime) name.")
@click.option("--version", "version", required=True, help="SemVer version of this release.")
@click.option("--kind", type=click.Choice(["model", "runtime"]), default="model", show_default=True)
@click.option(
    "--ring", type=click.Choice(["canary", "pilot", "ga"]), default="canary", show_default=True
)
@click.option("--percent", type=float, default=100.0, show_default=True)
@click.option(
    "--inputs",
    "inputs_npz",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Reference inputs (.npz, one array per input name); repeat for several sets. "
    "Default: generated from the input signature and graph.",
)
@click.option(
    "--golden-check",
    type=click.Choice(["values", "shapes"]),
    default="values",
    show_default=True,
    help="How devices compare outputs: with the golden values, or (outputs that vary from run "
    "to run) shapes, dtypes and finiteness only.",
)
@click.option(
    "--allow-degenerate-golden",
    is_flag=True,
    help="Publish even if golden outputs are constant, all zero or empty (recorded).",
)
@click.option(
    "--publisher-tier",
    default="default",
    show_default=True,
    help="Hardware tier of this machine: its --budget is checked by a reference run here.",
)
@click.option(
    "--allow-over-budget",
    is_flag=True,
    help="Publish even if the reference run here exceeds this tier's budget (recorded).",
)
@click.option("--arch", multiple=True, help="Compatible CPU architecture(s), e.g. aarch64.")
@click.option("--tier", "tiers", multiple=True, help="Compatible hardware tier(s).")
@click.option("--provider", "providers", multiple=True, help="Required execution provider(s).")
@click.option(
    "--runtime", "runtime_range", default="", help="onnxruntime version range, e.g. '>=1.20,<2'."
)
@click.option(
    "--runtime-version", default=None, help="Exact onnxruntime validated with (default: this one)."
)
@click.option("--min-client", default="0.0.0", show_default=True)
@click.option("--budget", "budgets", multiple=True, help="TIER:LATENCY_MS:PEAK_MB smoke budget.")
@click.option("--rtol", type=float, default=1e-3, show_default=True)
@click.option("--atol", type=float, default=1e-4, show_default=True)
@click.option("--max-model-mb", type=float, default=8192, show_default=True)
@click.option(
    "--security-floor",
    type=int,
    default=0,
    help="Refuse releases with a lower counter on devices from now on (kept by every later "
    "release).",
)
@click.option(
    "--allow-lower-version",
    is_flag=True,
    help="Publish a version that does not sort above the newest release (audit-logged).",
)
@click.option(
    "--reference-data",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Model outputs on representative data (.npz, output name -> array): the release's "
    "reference output distribution for drift gates. Default: the golden outputs.",
)
@click.option("--dataset", "datasets", multiple=True, help="Training dataset reference (SBOM).")
@click.option("--license", "licenses", multiple=True, help="SPDX licence id (SBOM).")
@click.option("--lineage", multiple=True, help="Base model reference (provenance).")
@click.option("--delta-releases", type=click.IntRange(0, 16), default=2, show_default=True,
              help="Binary deltas from this many recent releases (0: none; ADR 0012).")
@click.option("--delta-max-mb", type=click.FloatRange(0), default=512, show_default=True,
              help="No binary delta for files larger than this.")
@click.option("--delta-effort", type=click.Choice(["fast", "max"]), default="fast",
              show_default=True,
              help="max: also try zstd level 19 when the best delta is 15-85 % of the file, "
                   "and a longer LZMA2 search (minutes per file at 64 MiB; ADR 0012).")
@json_option
@_lean_option  # last: its callback runs after --project is known, before the command
def publish(
    model: Path,
    project_dir: str,
    name: str,
    version: str,
    kind: str,
    ring: str,
    percent: float,
    inputs_npz: tuple[Path, ...],
    golden_check: str,
    allow_degenerate_golden: bool,
    publisher_tier: str,
    allow_over_budget: bool,
    arch: tuple[str, ...],
    tiers: tuple[str, ...],
    providers: tuple[str, ...],
    runtime_range: str,
    runtime_version: str | None,
    min_client: str,
    budgets: tuple[str, ...],
    rtol: float,
    atol: float,
    max_model_mb: float,
    security_floor: int,
    allow_lower_version: bool,
    reference_data: Path | None,
    datasets: tuple[str, ...],
    licenses: tuple[str, ...],
    lineage: tuple[str, ...],
    delta_releases: int,
    delta_max_mb: float,
    delta_effort: str,
    as_json: bool,
) -> None:
    """Publish MODEL (an .onnx file, or a runtime folder with --kind runtime)."""
    from ota.bundle import Compat, validate_version
    from ota.repository import PublishRequest
    from ota.repository import publish as do_publish
    from ota.repository._deltas import DeltaSettings

    validate_version(min_client)
    req = PublishRequest(
        source=model,
        name=name,
        version=version,
        kind="runtime" if kind == "runtime" else "model",
        ring=ring,
        percent=percent,
        inputs_npz=list(inputs_npz) or None,
        golden_check=golden_check,
        allow_degenerate_golden=allow_degenerate_golden,
        publisher_tier=publisher_tier,
        allow_over_budget=allow_over_budget,
        compat=Compat(
            arch=arch,
            tiers=tiers,
            runtime=runtime_range,
            min_client=min_client,
            providers=providers,
        ),
        budgets=_budgets(budgets),
        rtol=rtol,
        atol=atol,
        max_model_bytes=int(max_model_mb * 1024 * 1024),
        security_floor=security_floor,
        allow_lower_version=allow_lower_version,
        reference_data=reference_data,
        datasets=datasets,
        licenses=licenses,
        training_data=datasets,
        lineage=lineage,
        runtime_version=runtime_version,
        deltas=DeltaSettings(releases=delta_releases,
                             max_file_bytes=int(delta_max_mb * 1024 * 1024),
                             slow_level=19 if delta_effort == "max" else 9),
    )
    project = _project(project_dir)
    # Probe the store before any work: a store that ignores conditional writes loses releases.
    if project.storage.check_conditional_writes() == "emulated":
        click.echo(
            "warning: this store ignores conditional writes; single-publisher mode serialises "
            "publishers on this host only: no other host may publish to it",
            err=True,
        )
    size = sum(
        p.stat().st_size for p in ([model] if model.is_file() else model.rglob("*")) if p.is_file()
    )
    with progress(size, f"publishing {name} {version}", not as_json) as cb:
        result = do_publish(project, req, progress=cb)
    up = result.upload
    emit(
        result.to_dict(),
        as_json,
        lambda: (
            f"published {result.name} {result.version} (release counter {result.counter}) "
            f"to ring {result.ring} at {result.percent:g}%\n"
            f"  {result.files} files, {result.total_bytes} bytes; "
            f"uploaded {up.bytes_uploaded} bytes in "
            f"{up.chunks_uploaded} of {up.chunks_total} chunks"
        ),
    )


def _state_line(name: str, s: object) -> str:
    from ota.bundle import RolloutState

    assert isinstance(s, RolloutState)
    flags = " ".join(f for f, on in (("paused", s.paused), ("YANKED", s.yanked)) if on)
    return f"{name} {s.version} (#{s.counter}): {s.ring} {s.percent:g}% {flags}".rstrip()


def _numeric_percent(doc: dict[str, Any]) -> dict[str, Any]:
    """``percent`` as a JSON number, as ``publish --json`` gives it (the signed index keeps
    it as a string for canonical JSON; the CLI's JSON is not signed)."""
    if isinstance(doc.get("percent"), str):
        doc["percent"] = float(doc["percent"])
    return doc


@click.command()
@click.argument("name")
@click.argument("version")
@project_option
@click.option("--ring", type=click.Choice(["canary", "pilot", "ga"]), required=True)
@click.option("--percent", type=float, default=100.0, show_default=True)
@json_option
def promote(
    name: str, version: str, project_dir: str, ring: str, percent: float, as_json: bool
) -> None:
    """Move a release to RING at PERCENT (canary -> pilot -> ga)."""
    from ota.repository import promote as do

    s = do(_project(project_dir), name, version, ring, percent)
    emit(_numeric_percent({"name": name, **s.to_dict()}), as_json, lambda: _state_line(name, s))


def _flag_command(cmd_name: str, helptext: str, field: str, value: bool) -> click.Command:
    @click.command(cmd_name, help=helptext)
    @click.argument("name")
    @click.argument("version")
    @project_option
    @json_option
    def cmd(name: str, version: str, project_dir: str, as_json: bool) -> None:
        from ota.repository import pause, yank

        fn = pause if field == "paused" else yank
        s = fn(_project(project_dir), name, version, value)
        emit(_numeric_percent({"name": name, **s.to_dict()}), as_json, lambda: _state_line(name, s))

    return cmd


@click.command()
@click.argument("name")
@project_option
@click.option("--to", "to_version", required=True, help="The earlier version to return to.")
@click.option(
    "--ring", type=click.Choice(["canary", "pilot", "ga"]), default="ga", show_default=True
)
@click.option("--percent", type=float, default=100.0, show_default=True)
@json_option
def rollback(
    name: str, project_dir: str, to_version: str, ring: str, percent: float, as_json: bool
) -> None:
    """Publish a new release of NAME carrying the files of an earlier version."""
    from ota.repository import rollback as do

    r = do(_project(project_dir), name, to_version, ring=ring, percent=percent)
    emit(
        r.to_dict(),
        as_json,
        lambda: (
            f"published {r.name} {r.version} (release counter {r.counter}) "
            f"= files of {to_version}; uploaded {r.upload.bytes_uploaded} bytes"
        ),
    )


@click.command()
@click.argument("name", required=False)
@project_option
@json_option
def releases(name: str | None, project_dir: str, as_json: bool) -> None:
    """List live releases and their rollout state."""
    from ota.repository import releases as do

    rows = do(_project(project_dir), name)
    emit(
        [_numeric_percent(r.to_dict()) for r in rows],
        as_json,
        lambda: "\n".join(_state_line(r.name, r.state) for r in rows) or "no releases",
    )


@click.command()
@project_option
@click.option(
    "--grace",
    type=float,
    default=3600.0,
    show_default=True,
    help="Keep unreferenced blobs younger than this many seconds.",
)
@click.option("--dry-run", is_flag=True)
@json_option
def gc(project_dir: str, grace: float, dry_run: bool, as_json: bool) -> None:
    """Delete blobs no published release references."""
    from ota.repository import gc as do

    r = do(_project(project_dir), grace_seconds=grace, dry_run=dry_run)
    emit(
        r.to_dict(),
        as_json,
        lambda: (
            f"{'would delete' if dry_run else 'deleted'} {r.deleted} blobs "
            f"({r.bytes_freed} bytes); {r.referenced} referenced, "
            f"{r.kept_young} kept (younger than grace)"
        ),
    )


@click.command("migrate-layout")
@project_option
@click.option(
    "--drop-retired",
    is_flag=True,
    help="Then rotate the snapshot key (root keys needed here) so the snapshot can forget the "
    "retired hash bins (ADR 0010).",
)
@json_option
def migrate_layout(project_dir: str, drop_retired: bool, as_json: bool) -> None:
    """Move the metadata from fixed hash bins to per-model roles (ADR 0010); idempotent."""
    from ota.repository._migrate import drop_retired as drop
    from ota.repository._migrate import migrate_layout as do

    project = _project(project_dir)
    r = do(project)
    d = drop(project) if drop_retired else None
    emit(
        r.to_dict() | (d.to_dict() if d is not None else {}),
        as_json,
        lambda: (
            f"migrated: {r.models} model roles, {r.live_releases} live releases, "
            f"{r.archived_releases} archived, {r.retired_bins} hash bins retired"
            if r.migrated
            else "already in the per-model layout (ADR 0010): nothing to do"
        )
        + (
            f"\nsnapshot key rotated (root {d.root_version}): {d.dropped} retired entries dropped"
            if d is not None and d.root_version is not None
            else ""
        ),
    )


@click.command()
@project_option
@click.option(
    "--root",
    "root_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Repository folder to serve (default: the project's local storage).",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Default: the port named in the project's base_url, else 8765.",
)
def serve(project_dir: str, root_dir: Path | None, host: str, port: int | None) -> None:
    """Serve a local repository read-only over HTTP (metadata, targets, blobs; Range)."""
    from ota.errors import ConfigError
    from ota.repository._serve import serve_forever

    project = None
    if root_dir is None:
        project = _project(project_dir)
        local = project.storage.local_root()
        if local is None:
            raise InputError("the project's storage is not a local folder", remedy="use --root")
        root_dir = local
    elif port is None:
        try:
            project = _project(project_dir)
        except ConfigError:
            project = None  # --root without a project: the default port
    if port is None:
        port = _base_url_port(project.config.base_url) if project is not None else None
    serve_forever(root_dir, host, 8765 if port is None else port)


def _base_url_port(base_url: str) -> int | None:
    """The port written in ``base_url`` (``http://127.0.0.1:9000/repo`` -> 9000), or None."""
    from urllib.parse import urlsplit

    from ota.errors import ConfigError

    try:
        return urlsplit(base_url).port
    except ValueError as e:
        raise ConfigError(f"bad base_url {base_url!r} in ota.toml: {e}") from e


def register(group: click.Group) -> None:
    for cmd in (init, publish, promote, rollback, releases, gc, migrate_layout, serve):
        group.add_command(cmd)
    group.add_command(_flag_command("pause", "Stop new installs of a release.", "paused", True))
    group.add_command(_flag_command("resume", "Resume a paused release.", "paused", False))
    group.add_command(
        _flag_command(
            "yank", "Withdraw a release: devices refuse it and revert from it.", "yanked", True
        )
    )
    group.add_command(_flag_command("unyank", "Undo a yank.", "yanked", False))
