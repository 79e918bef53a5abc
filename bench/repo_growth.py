"""Repository growth: what a device pays for metadata at 100 and 100,000 releases, per layout.

One repository per layout (``--layouts``: ``models``, the per-model roles of ADR 0010, and
``bins-N``, the hash bins of ADR 0002 with N bins, built as ``ota init`` built them before)
grows through the sizes in ``--releases``: at each size the older releases are generated in
bulk (:func:`bulk_add`), then the benchmark measures

* **publish**: best of ``--repeat`` real :func:`ota.repository.publish` calls of a small MLP as
  the next version of a model that has a real history (``commit`` being the metadata
  transaction, the part that can grow with the repository);
* **stock cold refresh**: the stock python-tuf ``ngclient.Updater`` over real HTTP from an empty
  metadata folder: ``refresh()``, the release's and the index's target info; body bytes;
* **device figures, on the wire** (where nginx is installed): the repository served by nginx
  with ``docs/serving/nginx-site.conf`` behind a relay that counts every byte both ways,
  headers included (:class:`bench._common.WireCounter`). The device session
  (:class:`ota.client._tuf.TufSession`, which asks for gzip on snapshot and roles) and the
  stock client each do a **cold refresh** for one model (``fleet-00000``: 100 releases, a full
  index window), then, after a real publish of **another** model, a **poll** (refresh, index,
  release), then an **idle poll**. Goals at the largest size for the device: cold <= 64 KiB,
  after another model's publish <= 16 KiB, idle <= 1 KiB.

Bulk generation (setup, untimed) goes through the publisher's own role code (see
:func:`bulk_add`): N releases over N/100 models, each a ``TargetFile`` with realistic
:class:`~ota.bundle.TargetFacts` custom data, one index per model (32 live releases), one
transaction per ``--batch`` releases. The manifests those targets name are not written (nothing
in the measured paths reads them). Signing uses the project's keys with a faster canonical-JSON
encoder, checked byte-for-byte against python-tuf's on the first role of every batch.

Run: ``python -m bench.repo_growth [--json] [--releases 100,100000]
[--layouts models,bins-256,bins-4096] [--repeat 3] [--batch 50000]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from securesystemslib.signer import Signer
from tuf.api.metadata import Key, Metadata, Signed, TargetFile
from tuf.api.serialization import SignedSerializer
from tuf.api.serialization.json import CanonicalJSONSerializer
from tuf.ngclient import Urllib3Fetcher

from bench._common import (
    PUBLISH_PHASES,
    WireCounter,
    base_parser,
    emit,
    environment,
    log,
    publish_phases,
    quiet_http_logs,
    ratio,
    scratch_dir,
    table,
    timed,
)
from ota.bundle import (
    PROVENANCE_FILE,
    RELEASE_FILE,
    SBOM_FILE,
    SIGNATURE_FILE,
    Compat,
    ModelIndex,
    Release,
    RolloutState,
    SmokeSpec,
    TargetFacts,
    index_target_path,
    manifest_target_path,
)
from ota.errors import ConfigError
from ota.repository._index import archive_dropped, ensure_model_role, read_index
from ota.repository._project import Project, put_target_file
from ota.repository._txn import SignerSet, Transaction, run

T = TypeVar("T")
GOAL_COLD = 64 * 1024  # bytes on the wire: a cold refresh for one model
GOAL_AFTER_OTHER = 16 * 1024  # the poll after a publish of another model
GOAL_IDLE = 1024  # an idle poll
MEASURED_MODEL = "bench-model"
OTHER_MODEL = "bench-other"
RELEASES_PER_MODEL = 100  # the bulk history: N releases spread over N/100 models


# -- signing fast enough for 4096 bins per batch ------------------------------------------------


class _FastCanonical(SignedSerializer):
    """OLPC canonical JSON through the C ``json`` encoder: identical bytes for metadata made only
    of ASCII strings without control characters, ints, bools and null (what ours is made of)."""

    def serialize(self, signed_obj: Signed) -> bytes:
        return json.dumps(
            signed_obj.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()


class BulkSigners(SignerSet):
    """The project's signers, signing with :class:`_FastCanonical`. The first role it signs is
    also serialised by python-tuf's own canonical serializer and compared byte for byte."""

    def __init__(self, inner: SignerSet) -> None:
        super().__init__({})
        self._inner = inner
        self._checked = False

    def _signer(self, keyid: str, public: Key) -> Signer | None:
        return self._inner._signer(keyid, public)

    def sign(
        self, md: Metadata[Any], keys: Mapping[str, Key], threshold: int, role: str
    ) -> None:
        fast = _FastCanonical()
        if not self._checked:
            if fast.serialize(md.signed) != CanonicalJSONSerializer().serialize(md.signed):
                raise AssertionError("fast canonical JSON differs from python-tuf's")
            self._checked = True
        md.signatures.clear()
        held = [s for k, pub in keys.items() if (s := self._signer(k, pub)) is not None]
        if len(held) < threshold:
            raise ConfigError(f"cannot sign {role}: {len(held)} keys, threshold {threshold}")
        for signer in held:
            md.sign(signer, append=True, signed_serializer=fast)


# -- bulk history ----------------------------------------------------------------------------


def _hex(*parts: object) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def _model_of(i: int, models: int) -> tuple[str, int]:
    """Release ``i`` of the bulk history: (model name, its counter for that model)."""
    return f"fleet-{i % models:05d}", i // models + 1


def release_target(name: str, counter: int) -> TargetFile:
    """A release target as ``publish`` writes it: manifest hash and length, and the facts."""
    version = f"1.{counter}.0"
    release = Release(
        name=name,
        version=version,
        counter=counter,
        compat=Compat(arch=("aarch64", "x86_64"), tiers=("edge-gpu",), runtime=">=1.16",
                      min_client="0.1.0"),
        smoke=SmokeSpec(),
        created="2026-11-01T12:00:00Z",
    )
    facts = TargetFacts(
        release=release,
        digests={p: _hex(name, version, p)
                 for p in (RELEASE_FILE, SBOM_FILE, PROVENANCE_FILE, SIGNATURE_FILE)},
    )
    path = manifest_target_path(name, version)
    return TargetFile(
        length=180_000 + counter % 997,
        hashes={"sha256": _hex(name, version, "manifest")},
        path=path,
        unrecognized_fields={"custom": facts.to_custom()},
    )


def bulk_add(project: Project, start: int, stop: int, models: int, batch: int,
             max_live: int) -> None:
    """Add bulk releases ``start..stop-1`` (spread over ``models`` models), one transaction per
    ``batch`` releases, with each touched model's index rewritten once per batch, through the
    publisher's own role code: :meth:`Transaction.bin_for` places each target (a model role,
    or a hash bin in the old layout), :func:`~ota.repository._index.ensure_model_role` creates
    model roles, :func:`~ota.repository._index.archive_dropped` moves releases that leave the
    index window to the archive (splitting its segments). Idempotent per release."""
    signers = BulkSigners(project.signers)
    for lo in range(start, stop, batch):
        hi = min(stop, lo + batch)
        targets = [release_target(*_model_of(i, models)) for i in range(lo, hi)]
        touched = sorted({i % models for i in range(lo, hi)})

        def index_of(m: int, hi: int = hi) -> ModelIndex:
            # releases of model m among 0..hi-1 are m, m+models, ...: counters 1..n
            n = (hi - 1 - m) // models + 1
            live = range(max(1, n - max_live + 1), n + 1)
            return ModelIndex(
                name=f"fleet-{m:05d}",
                releases=tuple(RolloutState(f"1.{c}.0", c, ring="ga") for c in live),
            )

        def put_index(m: int) -> tuple[ModelIndex, TargetFile]:
            index = index_of(m)
            info = put_target_file(project.storage, index_target_path(index.name),
                                   index.to_bytes())
            info.unrecognized_fields["custom"] = index.to_custom()
            return index, info

        with ThreadPoolExecutor(max_workers=8) as pool:
            indexes = list(pool.map(put_index, touched))

        def change(txn: Transaction, targets: list[TargetFile] = targets,
                   indexes: list[tuple[ModelIndex, TargetFile]] = indexes) -> None:
            legacy = txn.legacy_layout()
            for index, info in indexes:
                ensure_model_role(txn, index.name)
                txn.edit(txn.bin_for(info.path)).targets[info.path] = info
            place: dict[str, str] = {}  # per model: bin_for of a release path (its model role)
            for info in targets:
                name = info.path.split("/")[1]
                role = txn.bin_for(info.path) if legacy else place.get(name)
                if role is None:
                    role = place[name] = txn.bin_for(info.path)
                txn.edit(role).targets[info.path] = info
            for index, _ in indexes:
                archive_dropped(txn, index)

        signers._checked = False
        run(project.storage, signers, project.expiry(), change)


# -- cold client refresh -------------------------------------------------------------------


class CountingFetcher(Urllib3Fetcher):
    """python-tuf's urllib3 fetcher, counting requests and body bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0
        self.bytes = 0

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.requests += 1
        chunks = super()._fetch(url)  # raises here on HTTP errors, as the base class does

        def counted() -> Iterator[bytes]:
            for chunk in chunks:
                self.bytes += len(chunk)
                yield chunk

        return counted()


@dataclass
class Refresh:
    seconds: float
    bytes: int
    requests: int


def cold_refresh(base_url: str, trusted_root: bytes, name: str, version: str) -> Refresh:
    """A stock ``Updater`` from an empty folder: refresh, then the release's and index's
    target info. Raises if either target is not found."""
    from tuf.ngclient import Updater

    with tempfile.TemporaryDirectory(prefix="bench-client-") as tmp:
        work = Path(tmp)
        (work / "metadata").mkdir()
        (work / "targets").mkdir()
        fetcher = CountingFetcher()
        t0 = time.perf_counter()
        updater = Updater(
            metadata_dir=str(work / "metadata"),
            metadata_base_url=f"{base_url}/metadata/",
            target_dir=str(work / "targets"),
            target_base_url=f"{base_url}/targets/",
            fetcher=fetcher,
            bootstrap=trusted_root,
        )
        updater.refresh()
        for path in (manifest_target_path(name, version), index_target_path(name)):
            if updater.get_targetinfo(path) is None:
                raise AssertionError(f"{path} not found by the stock client")
        elapsed = time.perf_counter() - t0
    return Refresh(elapsed, fetcher.bytes, fetcher.requests)


# -- what a device pays on the wire (nginx, gzip where the device asks) ----------------------


def _device_lookup(url: str, trusted: bytes, work: Path, name: str, version: str) -> None:
    """The device's TUF session (:class:`ota.client._tuf.TufSession`: our fetcher, asking for
    gzip on snapshot and roles): refresh, then the model's index and release."""
    from ota.client._fetch import FetchConfig, make_pool
    from ota.client._tuf import TufSession

    cfg = FetchConfig()
    pool = make_pool(cfg)
    try:
        session = TufSession(work / "metadata", work / "cache", url, trusted, pool=pool,
                             fetch_cfg=cfg)
        session.refresh()
        if session.index(name) is None or session.release(name, version) is None:
            raise AssertionError(f"{name} {version} not found by the device session")
    finally:
        pool.clear()


def _stock_lookup(url: str, trusted: bytes, work: Path, name: str, version: str) -> int:
    """The stock ``Updater`` (its own urllib3 fetcher: no compression asked): refresh, index,
    release. Returns the body bytes it read."""
    from tuf.ngclient import Updater

    (work / "metadata").mkdir(parents=True, exist_ok=True)
    (work / "targets").mkdir(parents=True, exist_ok=True)
    fetcher = CountingFetcher()
    updater = Updater(metadata_dir=str(work / "metadata"), metadata_base_url=f"{url}/metadata/",
                      target_dir=str(work / "targets"), target_base_url=f"{url}/targets/",
                      fetcher=fetcher, bootstrap=trusted)
    updater.refresh()
    for path in (index_target_path(name), manifest_target_path(name, version)):
        if updater.get_targetinfo(path) is None:
            raise AssertionError(f"{path} not found by the stock client")
    return fetcher.bytes


class _S3Copy:
    """The folder repository's current metadata copied into a moto bucket through
    :class:`~ota.repository._s3.S3Storage` (so stored as a publish to S3 stores it: versioned
    snapshot and roles gzip-encoded), readable over HTTP with the documented bucket policy.
    :meth:`sync` copies what the current snapshot lists and was not copied yet, the head last."""

    def __init__(self, root: Path, endpoint: str) -> None:
        import boto3

        from ota.repository._s3 import S3Storage

        self.root = root
        self.bucket = f"bench-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}"
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=self.bucket)
        policy = (Path(__file__).resolve().parents[1] / "docs" / "serving"
                  / "s3-bucket-policy.json").read_text(encoding="utf-8")
        client.put_bucket_policy(Bucket=self.bucket, Policy=policy.replace(
            "@BUCKET@", self.bucket).replace("@PREFIX@", "repo/"))
        self.store = S3Storage(self.bucket, "repo", endpoint_url=endpoint)
        self._copied: set[str] = set()

    def sync(self) -> None:
        md = self.root / "metadata"
        head = json.loads((md / "timestamp.json").read_bytes())
        snap_v = head["signed"]["meta"]["snapshot.json"]["version"]
        snap = json.loads((md / f"{snap_v}.snapshot.json").read_bytes())
        names = [f"{m['version']}.{n}" for n, m in snap["signed"]["meta"].items()]
        names += [p.name for p in md.glob("*.root.json")] + [f"{snap_v}.snapshot.json"]
        todo = [n for n in names if n not in self._copied and (md / n).is_file()]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: self.store.put(f"metadata/{n}", (md / n).read_bytes()),
                          todo))
        self._copied |= set(todo)
        self.store.put("metadata/root.json", (md / "root.json").read_bytes())
        self.store.put("metadata/timestamp.json", (md / "timestamp.json").read_bytes())


def _device_target(project: Project) -> tuple[Path, bytes, str, str, int]:
    """The served folder, the trusted root, the model and newest version a measured device
    follows (:func:`_device_model`), and how many releases of it are live."""
    root = project.storage.local_root()
    assert root is not None
    trusted = (project.root_dir / "root.json").read_bytes()
    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    name = _device_model(txn)
    index = read_index(txn, name)
    assert index is not None
    version = max(index.releases, key=lambda r: r.counter).version
    return root, trusted, name, version, len(index.releases)


@contextlib.contextmanager
def _servers(root: Path) -> Iterator[dict[str, tuple[str, str, WireCounter, Any]]]:
    """nginx (``docs/serving/nginx-site.conf``, gzip where asked), ``ota serve`` (gzip where
    asked) and S3 (moto's server; versioned metadata stored gzip-encoded), each behind a
    :class:`WireCounter`: {name: (upstream, base path, counter, S3 copy or None)}."""
    from tests.nginx import serve_static
    from tests.repo_helpers import serve_dir
    from tests.s3server import S3Server, s3_env

    moto = S3Server()
    moto.start()
    saved = {k: os.environ.get(k) for k in s3_env(moto.url)}
    os.environ.update(s3_env(moto.url))
    try:
        with serve_static(root) as ngx, serve_dir(root) as ours, \
                WireCounter(ngx) as w1, WireCounter(ours) as w2, WireCounter(moto.url) as w3:
            copy = _S3Copy(root, moto.url)
            copy.sync()
            yield {"nginx": (ngx, "", w1, None), "serve": (ours, "", w2, None),
                   "s3": (moto.url, f"/{copy.bucket}/repo", w3, copy)}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        moto.stop()


def device_polls(project: Project, model: Path, other_version: str,
                 workdir: Path) -> dict[str, Any]:
    """Through nginx (``docs/serving/nginx-site.conf``), ``ota serve`` and S3 (moto's server,
    the metadata stored as ``ota publish`` stores it there), each behind a relay counting every
    byte both ways, headers included: a cold refresh for one model, the poll after a real
    publish of *another* model, an idle poll, and the poll after the first publish of a *new*
    model; by the device session on each server (keys ``device_*`` for nginx,
    ``serve_device_*``, ``s3_device_*``) and by the stock client through nginx. The
    device follows ``fleet-00000`` (a bulk model with a full index window, the largest a
    model role gets with the default ``max_live_releases``) or, before any bulk history, the
    measured model."""
    from ota.repository import PublishRequest, publish

    root, trusted, name, version, live = _device_target(project)
    out: dict[str, Any] = {"device_model": name, "device_model_live": live}
    shutil.rmtree(workdir / "polls", ignore_errors=True)
    with _servers(root) as servers:

        def step(label: str) -> None:
            for server, (_up, path, wire, copy) in servers.items():
                if copy is not None:
                    copy.sync()
                for who in ("device", "stock") if server == "nginx" else ("device",):
                    wire.reset()
                    work = workdir / "polls" / server / who
                    key = f"{who}_{label}" if server == "nginx" else f"{server}_{who}_{label}"
                    body = None
                    if who == "device":
                        _device_lookup(wire.url + path, trusted, work, name, version)
                    else:
                        body = _stock_lookup(wire.url + path, trusted, work, name, version)
                    out[f"{key}_wire"] = wire.sent + wire.received
                    if body is not None:
                        out[f"{key}_body"] = body

        step("cold")
        publish(project, PublishRequest(model, OTHER_MODEL, other_version))
        step("after_other")
        step("idle")
        # the first publish of a model nobody had: in the per-model layout it also changes
        # the delegation list in ``releases``, which every device then downloads once
        publish(project, PublishRequest(model, f"new-{other_version.replace('.', '-')}", "1.0.0"))
        step("after_new")
    return out


def crossing_poll(project: Project, workdir: Path, change: Callable[[], T]) -> tuple[T, int]:
    """A device session refreshes through nginx, ``change()`` runs (``--drop-retired``: root
    N+1 and a snapshot without the retired entries), then the same device polls again: the
    bytes on the wire of that crossing poll, headers included, and what ``change`` returned."""
    from tests.nginx import serve_static

    root, trusted, name, version, _live = _device_target(project)
    work = workdir / "crossing"
    shutil.rmtree(work, ignore_errors=True)
    with serve_static(root) as upstream, WireCounter(upstream) as wire:
        _device_lookup(wire.url, trusted, work, name, version)
        out = change()
        wire.reset()
        _device_lookup(wire.url, trusted, work, name, version)
        return out, wire.sent + wire.received


# -- one size ----------------------------------------------------------------------------------


def _device_model(txn: Transaction) -> str:
    return "fleet-00000" if read_index(txn, "fleet-00000") is not None else MEASURED_MODEL


def _metadata_sizes(project: Project) -> dict[str, int]:
    """Sizes of the committed snapshot, of ``releases`` and of the measured model's role (the
    one holding its index: a model role, or a hash bin in the old layout)."""
    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    snap_version = txn.timestamp.signed.snapshot_meta.version
    root = project.storage.local_root()
    assert root is not None
    meta = txn.snapshot.signed.meta

    def size(role: str) -> int:
        return (root / f"metadata/{meta[f'{role}.json'].version}.{role}.json").stat().st_size

    return {
        "snapshot_bytes": (root / f"metadata/{snap_version}.snapshot.json").stat().st_size,
        "snapshot_roles": len(meta),
        "releases_role_bytes": size("releases"),
        "model_role_bytes": size(txn.bin_for(index_target_path(_device_model(txn)))),
    }


def measure(project: Project, model: Path, first_version: int, repeat: int,
            workdir: Path, nginx: bool) -> dict[str, Any]:
    from ota.repository import PublishRequest, publish
    from tests.repo_helpers import serve_dir

    runs: list[tuple[float, dict[str, float]]] = []
    version = ""
    for k in range(max(1, repeat)):
        version = f"2.0.{first_version + k}"
        req = PublishRequest(model, MEASURED_MODEL, version)
        with publish_phases() as timer:
            seconds, _ = timed(partial(publish, project, req))
        runs.append((seconds, timer.breakdown(seconds, PUBLISH_PHASES)))
    best_publish = min(runs, key=lambda r: r[0])
    root = project.storage.local_root()
    assert root is not None
    trusted = (project.root_dir / "root.json").read_bytes()
    refreshes: list[Refresh] = []
    with serve_dir(root) as url:
        for _ in range(max(1, repeat)):
            refreshes.append(cold_refresh(url, trusted, MEASURED_MODEL, version))
    best_refresh = min(refreshes, key=lambda r: r.seconds)
    point = {
        "publish_s": round(best_publish[0], 4),
        "commit_s": round(min(r[1]["commit"] for r in runs), 4),
        "publish_phases_s": best_publish[1],
        "refresh_s": round(best_refresh.seconds, 4),
        "refresh_bytes": best_refresh.bytes,
        "refresh_requests": best_refresh.requests,
        **_metadata_sizes(project),
    }
    if nginx:
        point |= device_polls(project, model, f"1.0.{first_version}", workdir)
    return point


def grow(layout: str, sizes: list[int], workdir: Path, repeat: int, batch: int,
         nginx: bool) -> dict[str, Any]:
    """One repository in ``layout`` (``models``: ADR 0010; ``bins-N``: the old layout with N
    hash bins; ``migrated-bins-N``: the old layout, migrated by ``ota migrate-layout`` at the
    first size that finds it unmigrated; ``migrated-dropped-bins-N``: migrated, then
    ``--drop-retired``, the snapshot-key rotation that lets the snapshot forget the old bins),
    grown through ``sizes`` releases; measured at each."""
    from ota.repository import PublishRequest, init_project, publish
    from tests.onnx_models import write_mlp

    base = workdir / layout
    shutil.rmtree(base, ignore_errors=True)
    t0 = time.perf_counter()
    legacy = layout.startswith(("bins-", "migrated-"))
    bins = int(layout.rsplit("-", 1)[1]) if legacy else 256
    init_project(base / "proj", str(base / "repo"), bins=bins, legacy_bins=legacy)
    project = Project.open(base / "proj")
    init_s = time.perf_counter() - t0
    model = write_mlp(base / "model" / "model.onnx", in_features=64, hidden=256, out_features=16)
    publish(project, PublishRequest(model, MEASURED_MODEL, "2.0.0"))  # a real history
    publish(project, PublishRequest(model, OTHER_MODEL, "0.9.0"))  # the "other" model
    real = 2  # real releases published so far
    models = max(1, max(sizes) // RELEASES_PER_MODEL)
    points: list[dict[str, Any]] = []
    bulk_done = 0
    for size in sorted(sizes):
        # the first measured publish below is release number `size` of the repository
        want_bulk = max(bulk_done, size - real - 1)
        t1 = time.perf_counter()
        if want_bulk > bulk_done:
            bulk_add(project, bulk_done, want_bulk, models, batch,
                     project.config.max_live_releases)
            bulk_done = want_bulk
        bulk_s = time.perf_counter() - t1
        log(f"{layout}: {bulk_done + real + 1} releases (bulk {bulk_s:.1f}s), measuring")
        point: dict[str, Any] = {"releases": bulk_done + real + 1, "bulk_s": round(bulk_s, 1)}
        if layout.startswith("migrated-"):  # `ota migrate-layout` of the grown repository
            from ota.repository._migrate import migrate_layout

            t2 = time.perf_counter()
            moved = migrate_layout(project)
            point["migrate_s"] = round(time.perf_counter() - t2, 1)
            point["migrated"] = moved.to_dict()
            log(f"{layout}: migrated in {point['migrate_s']} s: {moved.to_dict()}")
            if layout.startswith("migrated-dropped-"):  # then --drop-retired (root keys here)
                from ota.repository._migrate import drop_retired

                t3 = time.perf_counter()
                if nginx:  # a device holding the migrated metadata, polling across the drop
                    dropped, point["device_crossing_wire"] = crossing_poll(
                        project, base, partial(drop_retired, project))
                else:
                    dropped = drop_retired(project)
                point["drop_retired_s"] = round(time.perf_counter() - t3, 1)
                point["drop_retired"] = dropped.to_dict()
                log(f"{layout}: --drop-retired in {point['drop_retired_s']} s: "
                    f"{dropped.to_dict()}")
        point |= measure(project, model, real, repeat, base, nginx)
        real += max(1, repeat) + (1 if nginx else 0)
        points.append(point)
    first = points[0]
    for p in points:
        p["publish_ratio"] = ratio(p["publish_s"], first["publish_s"])
        p["commit_ratio"] = ratio(p["commit_s"], first["commit_s"])
        p["refresh_s_ratio"] = ratio(p["refresh_s"], first["refresh_s"])
        p["refresh_bytes_ratio"] = ratio(p["refresh_bytes"], first["refresh_bytes"])
    last = points[-1]
    goal_met = nginx and (last["device_cold_wire"] <= GOAL_COLD
                          and last["device_after_other_wire"] <= GOAL_AFTER_OTHER
                          and last["device_idle_wire"] <= GOAL_IDLE)
    shutil.rmtree(base, ignore_errors=True)
    return {"layout": layout, "init_s": round(init_s, 1), "points": points,
            "goal_met": goal_met}


def run_all(sizes: list[int], layouts: list[str], repeat: int, batch: int,
            workdir: Path) -> dict[str, Any]:
    from tests import nginx

    quiet_http_logs()
    have_nginx = nginx.binary() is not None
    t0 = time.perf_counter()
    series = [grow(layout, sizes, workdir, repeat, batch, have_nginx) for layout in layouts]
    return {
        "benchmark": "repo_growth",
        "releases": sizes,
        "layouts": layouts,
        "repeat": repeat,
        "goal_bytes": {"cold": GOAL_COLD, "after_other": GOAL_AFTER_OTHER, "idle": GOAL_IDLE},
        "goal_met": series[0]["goal_met"],
        "series": series,
        "environment": environment(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def render(doc: dict[str, Any]) -> str:
    out = []
    for s in doc["series"]:
        rows = [
            [p["releases"], p["publish_s"], p["publish_ratio"], p["commit_s"],
             p["snapshot_roles"], p["snapshot_bytes"], p["releases_role_bytes"],
             p["model_role_bytes"], p.get("stock_cold_body", p["refresh_bytes"]),
             p["refresh_requests"],
             p.get("device_cold_wire", "-"), p.get("device_after_other_wire", "-"),
             p.get("device_idle_wire", "-"), p.get("device_after_new_wire", "-"),
             p.get("stock_after_other_wire", "-"), p["bulk_s"]]
            for p in s["points"]
        ]
        goal = "met" if s["goal_met"] else "NOT met"
        out.append(table(
            f"repo_growth: layout {s['layout']}, best of {doc['repeat']} (device figures on "
            f"the wire through nginx, headers included; goal at the largest size: cold <= "
            f"{GOAL_COLD}, after another model's publish <= {GOAL_AFTER_OTHER}, idle <= "
            f"{GOAL_IDLE} B: {goal})",
            ["releases", "publish s", "x", "commit s", "roles", "snapshot B", "releases B",
             "model role B", "stock cold B", "req", "device cold", "after other", "idle",
             "after new", "stock after other", "bulk s"],
            rows,
        ))
        for srv, what in (("serve", "ota serve (gzip where asked)"),
                          ("s3", "S3 (moto; versioned metadata stored gzip-encoded)")):
            figs = [[p["releases"], *(p.get(f"{srv}_device_{k}_wire", "-") for k in
                                      ("cold", "after_other", "idle", "after_new"))]
                    for p in s["points"]]  # fmt: skip
            out.append(table(f"  device on the wire through {what}",
                             ["releases", "cold", "after other", "idle", "after new"], figs))
        out.append("")
    return "\n".join(out)


def _sizes(text: str) -> list[int]:
    return sorted({int(x) for x in text.split(",") if x.strip()})


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "repo_growth")
    parser.add_argument("--releases", default="100,100000")
    parser.add_argument("--layouts", default="models,bins-256,bins-4096",
                        help="models (ADR 0010), bins-N (the old layout, N hash bins), "
                             "migrated-bins-N (the old layout grown, then migrated), "
                             "migrated-dropped-bins-N (then --drop-retired)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=50_000, help="bulk releases per transaction")
    args = parser.parse_args(argv)
    sizes = _sizes(args.releases)
    if not sizes or sizes[0] < 3:
        parser.error("--releases needs sizes >= 3")
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    with scratch_dir(args.workdir) as work:
        doc = run_all(sizes, layouts, args.repeat, args.batch, work)
    emit(doc, render(doc), args.json)


if __name__ == "__main__":
    main()
