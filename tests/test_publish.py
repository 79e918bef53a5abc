"""Release pipeline: init, publish, steer, rollback, gc; verified by the stock python-tuf client."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ota.bundle import (
    RELEASE_FILE,
    SIGNATURE_FILE,
    Manifest,
    ModelIndex,
    Release,
    TargetFacts,
    blob_key,
    index_target_path,
    manifest_target_path,
)
from ota.errors import ExitCode, InputError
from ota.repository import (
    DuplicateVersion,
    Project,
    gc,
    pause,
    promote,
    releases,
    rollback,
    yank,
)
from ota.signing import verify_digests
from tests.repo_helpers import make_project, publish_mlp, serve_dir, stock_updater


def _download_manifest(updater: object, name: str, version: str, dest: Path) -> Manifest:
    info = updater.get_targetinfo(manifest_target_path(name, version))  # type: ignore[attr-defined]
    assert info is not None
    path = updater.download_target(info, str(dest))  # type: ignore[attr-defined]
    return Manifest.from_bytes(Path(path).read_bytes())


def _fetch_blob(base: str, digest: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(f"{base}/{blob_key(digest)}") as r:
        data: bytes = r.read()
    assert hashlib.sha256(data).hexdigest() == digest
    return data


def test_stock_tuf_client_verifies_local_served_release(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    result = publish_mlp(project, "detector", "1.0.0")
    assert result.counter == 1
    root = (project.root_dir / "root.json").read_bytes()
    with serve_dir(tmp_path / "repo") as base:
        updater = stock_updater(base, root, tmp_path / "device")
        updater.refresh()
        manifest = _download_manifest(updater, "detector", "1.0.0", tmp_path / "m.json")
        info = updater.get_targetinfo(manifest_target_path("detector", "1.0.0"))
        facts = TargetFacts.from_custom(info.custom)
        # The bundle's release.json is byte-identical to the signed target facts.
        rel_entry = manifest.file(RELEASE_FILE)
        release_bytes = b"".join(_fetch_blob(base, c.sha256) for c in rel_entry.chunks)
        assert Release.from_bytes(release_bytes) == facts.release
        assert facts.release.counter == 1 and facts.release.smoke is not None
        # The OpenSSF model signature covers every other file, checked by the upstream library.
        sig = b"".join(_fetch_blob(base, c.sha256) for c in manifest.file(SIGNATURE_FILE).chunks)
        digests = {f.path: f.sha256 for f in manifest.files if f.path != SIGNATURE_FILE}
        pub = (project.root_dir / project.config.release_pub).read_bytes()
        verify_digests(sig, pub, digests, signature_name=SIGNATURE_FILE)
        index = ModelIndex.from_custom(updater.get_targetinfo(index_target_path("detector")).custom)
        assert [r.version for r in index.releases] == ["1.0.0"]


def test_stock_tuf_client_verifies_s3_release(
    tmp_path: Path, s3_endpoint: str, s3_url: str
) -> None:
    project = make_project(tmp_path, s3_url, s3_endpoint=s3_endpoint)
    publish_mlp(project, "detector", "1.0.0")
    bucket_path = s3_url[len("s3://") :]
    bucket = bucket_path.split("/", 1)[0]
    _public_read(s3_endpoint, bucket)  # devices read anonymously, as from a CDN or website
    base = f"{s3_endpoint}/{bucket_path}"
    updater = stock_updater(base, (project.root_dir / "root.json").read_bytes(), tmp_path / "dev")
    updater.refresh()
    manifest = _download_manifest(updater, "detector", "1.0.0", tmp_path / "m.json")
    model = manifest.file("model/model.onnx")
    data = b"".join(_fetch_blob(base, c.sha256) for c in model.chunks)
    assert hashlib.sha256(data).hexdigest() == model.sha256


def _public_read(endpoint: str, bucket: str) -> None:
    import boto3

    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{bucket}/*",
            }
        ],
    }
    boto3.client("s3", endpoint_url=endpoint).put_bucket_policy(
        Bucket=bucket, Policy=json.dumps(policy)
    )


def test_counters_rollout_and_rollback(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    publish_mlp(project, "m", "1.0.0", ring="ga")
    second = publish_mlp(project, "m", "1.1.0", seed=1)
    assert second.counter == 2
    assert promote(project, "m", "1.1.0", "pilot", 25.0).percent == 25.0
    assert pause(project, "m", "1.1.0").paused
    assert yank(project, "m", "1.1.0").yanked
    with pytest.raises(InputError):
        promote(project, "m", "1.1.0", "ga", 100)  # yanked releases cannot be promoted
    back = rollback(project, "m", "1.0.0")
    assert back.counter == 3 and back.version == "1.0.0+rollback.3"
    # Only the new release.json and signature were uploaded; the payload is shared.
    assert back.upload.chunks_uploaded <= 2
    rows = releases(project, "m")
    assert [r.state.version for r in rows] == ["1.0.0+rollback.3", "1.1.0", "1.0.0"]
    with pytest.raises(DuplicateVersion):
        publish_mlp(project, "m", "1.1.0")


def test_republish_uploads_only_new_chunks(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    first = publish_mlp(project, "m", "1.0.0")
    model = tmp_path / "models" / "m-1.0.0.onnx"
    (tmp_path / "models" / "m-1.0.1.onnx").write_bytes(model.read_bytes())
    again = publish_mlp(project, "m", "1.0.1")
    assert first.upload.bytes_uploaded == first.upload.bytes_total
    model_size = model.stat().st_size
    assert again.upload.bytes_uploaded < again.upload.bytes_total - model_size + 1


def test_gc_removes_only_unreferenced_old_blobs(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    publish_mlp(project, "m", "1.0.0")
    orphan = tmp_path / "repo" / blob_key("ab" * 32)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"left by a crashed publisher")
    assert gc(project, grace_seconds=3600).deleted == 0  # too young: may be a publish in flight
    result = gc(project, grace_seconds=0)
    assert result.deleted == 1 and not orphan.exists()
    assert result.referenced > 0
    with serve_dir(tmp_path / "repo") as base:
        updater = stock_updater(base, (project.root_dir / "root.json").read_bytes(), tmp_path / "d")
        updater.refresh()
        manifest = _download_manifest(updater, "m", "1.0.0", tmp_path / "m.json")
        for f in manifest.files:
            for c in f.chunks:
                _fetch_blob(base, c.sha256)


# -- the CLI: bad input gives one line, a distinct exit code, and publishes nothing --------


def _cli(args: list[str]) -> tuple[int, str]:
    from ota.cli._main import _register, cli

    _register()
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return result.exit_code, result.output


def _snapshot_of(repo: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(repo)): p.read_bytes() for p in sorted((repo / "metadata").glob("*.json"))
    }


@pytest.fixture
def cli_project(tmp_path: Path) -> Path:
    code, out = _cli(
        [
            "init",
            str(tmp_path / "repo"),
            "--project",
            str(tmp_path / "proj"),
            "--bins",
            "16",
            "--json",
        ]
    )
    assert code == 0, out
    assert json.loads(out)["bins"] == 16
    return tmp_path


@pytest.mark.parametrize(
    ("make_input", "extra", "code"),
    [
        (lambda d: d / "not-onnx.onnx", [], ExitCode.INPUT),
        (lambda d: d / "truncated.onnx", [], ExitCode.INPUT),
        (lambda d: d / "good.onnx", ["--version", "v1"], ExitCode.INPUT),
        (lambda d: d / "good.onnx", ["--max-model-mb", "0.001"], ExitCode.INPUT),
        (lambda d: d / "good.onnx", ["--name", "Bad Name!"], ExitCode.INPUT),
        (lambda d: d / "good.onnx", ["--percent", "250"], ExitCode.INPUT),
    ],
    ids=["not-onnx", "truncated", "bad-version", "over-budget", "bad-name", "bad-percent"],
)
def test_bad_input_is_refused_and_publishes_nothing(
    cli_project: Path, make_input: object, extra: list[str], code: ExitCode
) -> None:
    from tests.onnx_models import write_mlp

    d = cli_project
    good = write_mlp(d / "good.onnx")
    (d / "not-onnx.onnx").write_bytes(b"\x89PNG\r\n\x1a\n not a model")
    (d / "truncated.onnx").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    before = _snapshot_of(d / "repo")
    args = [
        "publish",
        str(make_input(d)),  # type: ignore[operator]
        "--project",
        str(d / "proj"),
        "--name",
        "m",
        "--version",
        "1.0.0",
        *extra,
    ]
    # click keeps the last of a repeated option, so the overrides in `extra` win
    exit_code, out = _cli(args)
    assert exit_code == code, out
    assert out.startswith("error: ") or "Error" in out
    assert _snapshot_of(d / "repo") == before


def test_duplicate_version_and_missing_key(cli_project: Path) -> None:
    from tests.onnx_models import write_mlp

    d = cli_project
    model = write_mlp(d / "good.onnx")
    base = ["publish", str(model), "--project", str(d / "proj"), "--name", "m"]
    assert _cli([*base, "--version", "1.0.0"])[0] == 0
    before = _snapshot_of(d / "repo")
    code, out = _cli([*base, "--version", "1.0.0"])
    assert code == ExitCode.INPUT and "already published" in out
    (d / "proj" / "keys" / "online" / "bins.pem").unlink()
    code, out = _cli([*base, "--version", "1.0.1"])
    assert code == ExitCode.CONFIG, out
    assert _snapshot_of(d / "repo") == before


def test_unreachable_and_misconfigured_storage(tmp_path: Path, s3_endpoint: str) -> None:
    code, out = _cli(
        [
            "init",
            "s3://no-such-bucket-here/x",
            "--project",
            str(tmp_path / "p1"),
            "--s3-endpoint",
            s3_endpoint,
        ]
    )
    assert code == ExitCode.CONFIG, out
    code, out = _cli(
        [
            "init",
            "s3://bucket/x",
            "--project",
            str(tmp_path / "p2"),
            "--s3-endpoint",
            "http://127.0.0.1:9",
        ]
    )
    assert code == ExitCode.TRANSIENT, out
    code, out = _cli(["releases", "--project", str(tmp_path / "nowhere")])
    assert code == ExitCode.CONFIG, out


def test_project_reopens_with_config(cli_project: Path) -> None:
    project = Project.open(cli_project / "proj")
    assert project.config.bins == 16
    assert project.storage.exists("metadata/timestamp.json")


def test_lost_reply_on_commit_is_not_a_conflict(tmp_path: Path) -> None:
    """S3 retries a conditional write whose reply was lost; the retry answers 412 although the
    first attempt landed. The transaction must recognise its own bytes, not report a conflict
    (or, worse, skip a version that it already published)."""
    from ota.repository import FileStorage, PreconditionFailed

    class LostReply(FileStorage):
        def __init__(self, root: Path) -> None:
            super().__init__(root)
            self.tripped: set[str] = set()

        def put(
            self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
        ) -> str:
            etag = super().put(key, data, if_none_match=if_none_match, if_match=if_match)
            conditional = if_match is not None or if_none_match
            if conditional and key.startswith("metadata/") and key not in self.tripped:
                self.tripped.add(key)
                raise PreconditionFailed(f"{key}: retried after a lost reply")
            return etag

    project = make_project(tmp_path)
    project.storage = LostReply(tmp_path / "repo")
    result = publish_mlp(project, "m", "1.0.0")
    assert result.counter == 1
    assert "metadata/timestamp.json" in project.storage.tripped
    snapshots = sorted((tmp_path / "repo" / "metadata").glob("*.snapshot.json"))
    assert [p.name for p in snapshots] == ["1.snapshot.json", "2.snapshot.json"]
    assert [r.state.version for r in releases(project, "m")] == ["1.0.0"]


def test_runtime_bundle_publishes_with_wheel_sbom(tmp_path: Path) -> None:
    from ota.repository import PublishRequest, publish
    from ota.sbom import load_sbom

    project = make_project(tmp_path)
    folder = tmp_path / "ort"
    folder.mkdir()
    wheel = folder / "onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_aarch64.whl"
    wheel.write_bytes(b"PK\x03\x04 wheel bytes " * 1000)
    (folder / "LICENSE").write_text("MIT")
    result = publish(
        project,
        PublishRequest(source=folder, name="ort-aarch64", version="1.31.1", kind="runtime"),
    )
    assert result.counter == 1
    with serve_dir(tmp_path / "repo") as base:
        updater = stock_updater(base, (project.root_dir / "root.json").read_bytes(), tmp_path / "d")
        updater.refresh()
        manifest = _download_manifest(updater, "ort-aarch64", "1.31.1", tmp_path / "m.json")
        paths = {f.path for f in manifest.files}
        assert {"runtime/LICENSE", f"runtime/{wheel.name}", "sbom.cdx.json"} <= paths
        facts = TargetFacts.from_custom(
            updater.get_targetinfo(manifest_target_path("ort-aarch64", "1.31.1")).custom
        )
        assert facts.release.kind == "runtime"
        assert facts.release.smoke is None
        sbom = b"".join(_fetch_blob(base, c.sha256) for c in manifest.file("sbom.cdx.json").chunks)
    purls = {c.purl for c in load_sbom(sbom).components}
    assert "pkg:pypi/onnxruntime@1.31.1" in purls


def test_ota_serve_answers_range_requests_and_hides_temp_files(tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    project = make_project(tmp_path)
    publish_mlp(project, "m", "1.0.0")
    blobs = [p for p in (tmp_path / "repo" / "blobs").rglob("*") if p.is_file()]
    assert blobs
    path = blobs[0]
    data = path.read_bytes()
    rel = path.relative_to(tmp_path / "repo").as_posix()
    (path.parent / ".hidden.tmp").write_bytes(b"partial")
    with serve_dir(tmp_path / "repo") as base:
        req = urllib.request.Request(f"{base}/{rel}", headers={"Range": "bytes=1-4"})
        with urllib.request.urlopen(req) as r:
            assert r.status == 206
            assert r.read() == data[1:5]
        for bad in (
            f"{base}/{path.parent.relative_to(tmp_path / 'repo').as_posix()}/.hidden.tmp",
            f"{base}/ota.toml",
            f"{base}/metadata/../../proj/ota.toml",
        ):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(bad)
            assert e.value.code == 404
            e.value.close()


def test_wrong_key_file_is_a_config_error_and_publishes_nothing(cli_project: Path) -> None:
    from tests.onnx_models import write_mlp

    d = cli_project
    model = write_mlp(d / "good.onnx")
    before = _snapshot_of(d / "repo")
    # Replace the online bins key with another valid Ed25519 key: the signer must notice that
    # it does not match the public key the metadata names.
    from ota.repository._project import generate_ed25519

    generate_ed25519(d / "proj" / "keys" / "online" / "bins.pem")
    code, out = _cli(
        ["publish", str(model), "--project", str(d / "proj"), "--name", "m", "--version", "1.0.0"]
    )
    assert code == ExitCode.CONFIG, out
    assert _snapshot_of(d / "repo") == before


def test_a_bundle_devices_would_refuse_is_not_published(tmp_path: Path) -> None:
    """4,100 files is over the device's ``max_files``: devices would take the manifest for an
    attack, so the publisher refuses it and publishes nothing (review finding)."""
    from ota.bundle import DEFAULT_LIMITS
    from ota.repository import PublishRequest, publish

    project = make_project(tmp_path, bins=4)
    rt = tmp_path / "rt" / "lib"
    rt.mkdir(parents=True)
    for i in range(DEFAULT_LIMITS.max_files + 4):
        (rt / f"f{i}.txt").write_bytes(b"x%d" % i)
    with pytest.raises(InputError, match="devices would refuse"):
        publish(project, PublishRequest(source=rt.parent, name="rt", version="1.0.0",
                                        kind="runtime", runtime_version="1.20.0"))
    assert releases(project) == []  # nothing of it was published
