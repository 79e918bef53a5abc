"""OpenSSF model signing of bundles: our signatures, the upstream verifier, and tampering."""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ota.errors import ConfigError, InputError, SecurityError, TransientError
from ota.signing import (
    SignatureError,
    sign_bundle,
    sign_digests,
    sign_keyless,
    verify_bundle,
    verify_digests,
)

BUNDLE_FILES = {
    "release.json": b'{"name":"resnet","version":"1.0.0"}',
    "model/model.onnx": os.urandom(200_000),
    "model/weights.bin": os.urandom(50_000),
    "smoke/inputs.npz": b"inputs",
    "smoke/golden.npz": b"golden",
    "sbom.cdx.json": b'{"bomFormat":"CycloneDX"}',
    "provenance.intoto.json": b'{"payloadType":"application/vnd.in-toto+json"}',
}


@pytest.fixture(scope="module")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    return _ec_keypair(tmp_path_factory.mktemp("keys"), "ms")


@pytest.fixture(scope="module")
def other_keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    return _ec_keypair(tmp_path_factory.mktemp("other"), "other")


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    root = tmp_path / "resnet-1.0.0"
    for rel, data in BUNDLE_FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


@pytest.fixture
def signed(bundle: Path, keypair: tuple[Path, bytes]) -> Path:
    sign_bundle(bundle, keypair[0])
    return bundle


def _ec_keypair(folder: Path, name: str) -> tuple[Path, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    path = folder / f"{name}.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return path, pub


def _upstream_verify(
    bundle: Path, public_pem: bytes, tmp: Path
) -> subprocess.CompletedProcess[str]:
    """Run the upstream ``model_signing`` CLI (not our code) as a subprocess."""
    pub = tmp / "upstream-key.pub"
    pub.write_bytes(public_pem)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "model_signing",
            "verify",
            "key",
            str(bundle),
            "--signature",
            str(bundle / "model.sig"),
            "--public_key",
            str(pub),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _payload(sig: Path) -> dict[str, object]:
    envelope = json.loads(sig.read_text())["dsseEnvelope"]
    result: dict[str, object] = json.loads(base64.b64decode(envelope["payload"]))
    return result


def _digests(bundle: Path) -> dict[str, str]:
    return {
        p.relative_to(bundle).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in bundle.rglob("*")
        if p.is_file() and p.name != "model.sig"
    }


# -- keyed signing, our verifier ------------------------------------------------------------


def test_sign_and_verify_roundtrip(signed: Path, keypair: tuple[Path, bytes]) -> None:
    info = verify_bundle(signed, keypair[1])
    der = serialization.load_pem_public_key(keypair[1]).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert info.key_fingerprint == hashlib.sha256(der).hexdigest()
    assert dict(info.files) == _digests(signed)
    assert info.model_name == "resnet-1.0.0"


def test_signature_records_file_mode_and_ignores_only_itself(signed: Path) -> None:
    payload = _payload(signed / "model.sig")
    assert payload["predicateType"] == "https://model_signing/signature/v1.0"
    predicate = payload["predicate"]
    assert isinstance(predicate, dict)
    assert predicate["serialization"] == {
        "method": "files",
        "hash_type": "sha256",
        "allow_symlinks": False,
        "ignore_paths": ["model.sig"],
    }


def test_resigning_never_signs_the_old_signature(signed: Path, keypair: tuple[Path, bytes]) -> None:
    sign_bundle(signed, keypair[0])
    info = verify_bundle(signed, keypair[1])
    assert "model.sig" not in info.files


# -- interop: the upstream model_signing CLI verifies what we sign -------------------------


def test_upstream_cli_verifies_our_signature(
    signed: Path, keypair: tuple[Path, bytes], tmp_path: Path
) -> None:
    result = _upstream_verify(signed, keypair[1], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Verification succeeded" in result.stdout


def _flip_byte(bundle: Path) -> None:
    path = bundle / "model/model.onnx"
    data = bytearray(path.read_bytes())
    data[1234] ^= 0x01
    path.write_bytes(bytes(data))


def _add_file(bundle: Path) -> None:
    (bundle / "model/extra.onnx").write_bytes(b"not signed")


def _remove_file(bundle: Path) -> None:
    (bundle / "smoke/golden.npz").unlink()


TAMPERS = {"flip-byte": _flip_byte, "add-file": _add_file, "remove-file": _remove_file}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_tampered_bundle_refused_by_us_and_upstream(
    signed: Path, keypair: tuple[Path, bytes], tmp_path: Path, tamper: str
) -> None:
    TAMPERS[tamper](signed)
    with pytest.raises(SignatureError) as exc:
        verify_bundle(signed, keypair[1])
    assert isinstance(exc.value, SecurityError)
    upstream = _upstream_verify(signed, keypair[1], tmp_path)
    assert upstream.returncode != 0
    assert "Verification failed" in upstream.stderr


def test_signature_by_another_key_refused_by_us_and_upstream(
    bundle: Path,
    keypair: tuple[Path, bytes],
    other_keypair: tuple[Path, bytes],
    tmp_path: Path,
) -> None:
    sign_bundle(bundle, other_keypair[0])  # the attacker's key, a valid signature otherwise
    with pytest.raises(SignatureError, match="Key mismatch"):
        verify_bundle(bundle, keypair[1])
    assert _upstream_verify(bundle, keypair[1], tmp_path).returncode != 0


def test_forged_payload_with_reused_signature_refused(
    signed: Path, keypair: tuple[Path, bytes]
) -> None:
    """A statement edited to match tampered files, with the old signature bytes, fails."""
    _flip_byte(signed)
    sig = signed / "model.sig"
    doc = json.loads(sig.read_text())
    payload = _payload(sig)
    predicate = payload["predicate"]
    assert isinstance(predicate, dict)
    for r in predicate["resources"]:
        if r["name"] == "model/model.onnx":
            r["digest"] = hashlib.sha256((signed / "model/model.onnx").read_bytes()).hexdigest()
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    sig.write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="refused"):
        verify_bundle(signed, keypair[1])


@pytest.mark.parametrize(
    "content", [b"", b"not json", b"{}", b'{"mediaType": "x", "dsseEnvelope": 3}', b"[1]"]
)
def test_malformed_signature_refused(
    signed: Path, keypair: tuple[Path, bytes], content: bytes
) -> None:
    (signed / "model.sig").write_bytes(content)
    with pytest.raises(SignatureError):
        verify_bundle(signed, keypair[1])


def test_missing_signature_refused(bundle: Path, keypair: tuple[Path, bytes]) -> None:
    with pytest.raises(SignatureError, match="no signature"):
        verify_bundle(bundle, keypair[1])


def test_signed_ignore_paths_cannot_hide_files(
    bundle: Path, keypair: tuple[Path, bytes], tmp_path: Path
) -> None:
    """Upstream honours ``ignore_paths`` recorded in a signature; we require every file signed."""
    hashing: Any = importlib.import_module("model_signing.hashing")
    signing: Any = importlib.import_module("model_signing.signing")
    signing.Config().use_elliptic_key_signer(private_key=keypair[0]).set_hashing_config(
        hashing.Config().set_ignored_paths(paths=["model.sig", "model"], ignore_git_paths=False)
    ).sign(bundle, bundle / "model.sig")
    assert _upstream_verify(bundle, keypair[1], tmp_path).returncode == 0  # upstream accepts
    with pytest.raises(SignatureError, match="unsigned"):
        verify_bundle(bundle, keypair[1])


def test_symlink_in_bundle(bundle: Path, keypair: tuple[Path, bytes]) -> None:
    sign_bundle(bundle, keypair[0])
    (bundle / "model/link.onnx").symlink_to(bundle / "model/model.onnx")
    with pytest.raises(SignatureError):
        verify_bundle(bundle, keypair[1])
    with pytest.raises(InputError):
        sign_bundle(bundle, keypair[0])


# -- keys model_signing cannot use ---------------------------------------------------------


def test_ed25519_and_bad_keys_are_config_errors(bundle: Path, tmp_path: Path) -> None:
    ed = ed25519.Ed25519PrivateKey.generate()
    ed_path = tmp_path / "ed.pem"
    ed_path.write_bytes(
        ed.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigError, match="P-256"):
        sign_bundle(bundle, ed_path)
    with pytest.raises(ConfigError, match="cannot read"):
        sign_bundle(bundle, tmp_path / "missing.pem")
    ed_pub = ed.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(ConfigError):
        verify_bundle(bundle, ed_pub)
    with pytest.raises(ConfigError):
        verify_bundle(bundle, b"not a key")
    assert not (bundle / "model.sig").exists()


# -- signing precomputed digests -----------------------------------------------------------


def test_sign_digests_equals_sign_bundle_and_upstream_accepts(
    bundle: Path, keypair: tuple[Path, bytes], tmp_path: Path
) -> None:
    digests = _digests(bundle)
    staged = tmp_path / "staging" / "sig.json"
    sign_digests(digests, keypair[0], staged, model_name=bundle.name, signature_name="model.sig")
    sign_bundle(bundle, keypair[0])
    assert _payload(staged) == _payload(bundle / "model.sig")  # same statement, byte for byte
    (bundle / "model.sig").write_bytes(staged.read_bytes())
    result = _upstream_verify(bundle, keypair[1], tmp_path)
    assert result.returncode == 0, result.stderr
    assert verify_bundle(bundle, keypair[1]).files == digests


def test_verify_digests_without_rehashing(signed: Path, keypair: tuple[Path, bytes]) -> None:
    signature = (signed / "model.sig").read_bytes()
    digests = _digests(signed)
    info = verify_digests(signature, keypair[1], digests, signature_name="model.sig")
    assert dict(info.files) == digests
    wrong = dict(digests, **{"release.json": "0" * 64})
    with pytest.raises(SignatureError, match=r"changed release\.json"):
        verify_digests(signature, keypair[1], wrong, signature_name="model.sig")
    extra = dict(digests, **{"model/extra.bin": "1" * 64})
    with pytest.raises(SignatureError):
        verify_digests(signature, keypair[1], extra, signature_name="model.sig")


@pytest.mark.parametrize(
    "digests",
    [{}, {"../x": "0" * 64}, {"a.bin": "XYZ"}, {"model.sig": "0" * 64}],
)
def test_sign_digests_rejects_bad_input(
    digests: dict[str, str], keypair: tuple[Path, bytes], tmp_path: Path
) -> None:
    with pytest.raises(InputError):
        sign_digests(digests, keypair[0], tmp_path / "model.sig")
    assert not (tmp_path / "model.sig").exists()


# -- keyless -------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every HTTP(S) request goes to a closed local port: connection refused, as offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    _set_proxy(monkeypatch, url)


def _set_proxy(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)


@pytest.mark.usefixtures("offline")
def test_keyless_offline_fails_fast_with_a_clear_message(bundle: Path) -> None:
    with pytest.raises(TransientError) as exc:  # a generous deadline: the child's imports
        sign_keyless(bundle, deadline_s=300.0, identity_token="header.payload.signature")
    # failed by itself (the network is down), not cut by the deadline
    assert "Sigstore keyless signing failed" in str(exc.value)
    assert exc.value.remedy
    assert not (bundle / "model.sig").exists()


@pytest.fixture
def black_hole_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[socket.socket]]:
    """An HTTPS proxy that accepts connections and never answers: a network that hangs."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    _set_proxy(monkeypatch, f"http://127.0.0.1:{server.getsockname()[1]}")
    yield accepted
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def test_keyless_hanging_network_is_cut_at_the_deadline(
    bundle: Path, black_hole_proxy: list[socket.socket]
) -> None:
    """A network that accepts and never answers is cut at the deadline, and nothing is written.

    The deadline also covers the child's start (importing sigstore), which on a loaded machine
    can outlast a short deadline before any connection is made. So the deadline doubles until
    an attempt has reached the (hanging) network; every attempt must be cut at its deadline.
    """
    deadline = 2.0
    while True:
        reached = len(black_hole_proxy)
        start = time.monotonic()
        with pytest.raises(TransientError, match=rf"did not finish within {deadline:.1f} s"):
            sign_keyless(bundle, deadline_s=deadline, identity_token="header.payload.signature")
        elapsed = time.monotonic() - start
        assert elapsed >= deadline  # never given up early
        assert elapsed < deadline + 60.0  # cut: the hanging network would never answer
        assert not (bundle / "model.sig").exists()
        if len(black_hole_proxy) > reached:
            break  # this attempt hung on the network and was cut at its deadline
        assert deadline < 64.0, "sigstore never reached the (hanging) network"
        deadline *= 2


def test_keyless_without_identity_is_a_config_error(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("GITHUB_ACTIONS", "GITLAB_CI", "BUILDKITE", "CIRCLECI", "SIGSTORE_ID_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="no OIDC identity token"):
        sign_keyless(bundle, deadline_s=30.0)
    with pytest.raises(InputError):
        sign_keyless(bundle, deadline_s=0)
