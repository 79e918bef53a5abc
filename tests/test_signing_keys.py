"""Keys by URI: file2:, envvar: and awskms: (against moto's KMS over real HTTP)."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.signer import CryptoSigner, Signer, SSlibKey

from ota.errors import ConfigError, InputError, TransientError
from ota.signing import (
    EnvVarSigner,
    generate_key,
    import_kms_key,
    load_signer,
    public_key_pem,
)

PAYLOAD = b"edge-ota: bytes to sign" * 10

# -- generate_key / file2: -----------------------------------------------------------------


@pytest.mark.parametrize(("kind", "keytype"), [("ed25519", "ed25519"), ("ecdsa-p256", "ecdsa")])
def test_generate_key_writes_a_private_file_and_loads_by_uri(
    tmp_path: Path, kind: Any, keytype: str
) -> None:
    uri, pub = generate_key(tmp_path / "keys", "root", kind=kind)
    path = tmp_path / "keys" / "root.pem"
    assert uri == f"file2:{path}"
    assert pub.keytype == keytype
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    signer = load_signer(uri, pub)
    pub.verify_signature(signer.sign(PAYLOAD), PAYLOAD)
    assert public_key_pem(pub).startswith(b"-----BEGIN PUBLIC KEY-----")


def test_generate_key_refuses_to_overwrite_and_bad_input(tmp_path: Path) -> None:
    generate_key(tmp_path, "timestamp")
    with pytest.raises(InputError, match="exists"):
        generate_key(tmp_path, "timestamp")
    with pytest.raises(InputError):
        generate_key(tmp_path, "../escape")
    with pytest.raises(InputError):
        generate_key(tmp_path, "rsa", kind="rsa")  # type: ignore[arg-type]


def test_file_key_missing_or_mismatched_is_a_config_error(tmp_path: Path) -> None:
    uri, pub = generate_key(tmp_path, "snapshot")
    _, other_pub = generate_key(tmp_path, "other")
    with pytest.raises(ConfigError, match="not found") as exc:
        load_signer(f"file2:{tmp_path / 'missing.pem'}", pub)
    assert exc.value.remedy
    with pytest.raises(ConfigError, match="does not match"):
        load_signer(uri, other_pub)
    (tmp_path / "garbage.pem").write_text("garbage")
    with pytest.raises(ConfigError):
        load_signer(f"file2:{tmp_path / 'garbage.pem'}", pub)


@pytest.mark.parametrize("uri", ["nope:x", "file2", "", "gibberish"])
def test_unknown_or_malformed_uri(tmp_path: Path, uri: str) -> None:
    _, pub = generate_key(tmp_path, "k")
    with pytest.raises(ConfigError):
        load_signer(uri, pub)


# -- envvar: -------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["pem", "base64"])
def test_envvar_key(monkeypatch: pytest.MonkeyPatch, encoding: str) -> None:
    signer = CryptoSigner.generate_ecdsa()
    pem = signer.private_bytes
    value = pem.decode() if encoding == "pem" else base64.b64encode(pem).decode()
    monkeypatch.setenv("OTA_TEST_KEY", value)
    loaded = load_signer("envvar:OTA_TEST_KEY", signer.public_key)
    assert isinstance(loaded, EnvVarSigner)
    signer.public_key.verify_signature(loaded.sign(PAYLOAD), PAYLOAD)
    # registered in securesystemslib's scheme table: tuf tooling can use the URI directly
    direct = Signer.from_priv_key_uri("envvar:OTA_TEST_KEY", signer.public_key)
    signer.public_key.verify_signature(direct.sign(PAYLOAD), PAYLOAD)


def test_envvar_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    signer = CryptoSigner.generate_ed25519()
    monkeypatch.delenv("OTA_ABSENT", raising=False)
    with pytest.raises(ConfigError, match="not set") as exc:
        load_signer("envvar:OTA_ABSENT", signer.public_key)
    assert "export OTA_ABSENT" in exc.value.remedy
    monkeypatch.setenv("OTA_BAD", "this is not a key")
    with pytest.raises(ConfigError, match="PEM"):
        load_signer("envvar:OTA_BAD", signer.public_key)
    monkeypatch.setenv("OTA_OTHER", CryptoSigner.generate_ed25519().private_bytes.decode())
    with pytest.raises(ConfigError, match="does not match"):
        load_signer("envvar:OTA_OTHER", signer.public_key)
    with pytest.raises(ConfigError):
        load_signer("envvar:not-a-name!", signer.public_key)


# -- awskms: against moto's KMS server over HTTP -------------------------------------------


@pytest.fixture(scope="module")
def kms_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def kms_env(kms_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Ambient AWS settings as AWSSigner reads them; nothing from the host's ~/.aws."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "absent-credentials"))
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", kms_endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return kms_endpoint


def _create_kms_key(spec: str = "ECC_NIST_P256", usage: str = "SIGN_VERIFY") -> str:
    import boto3

    kms = boto3.client("kms")
    key_id: str = kms.create_key(KeySpec=spec, KeyUsage=usage)["KeyMetadata"]["KeyId"]
    return key_id


def test_kms_import_and_sign(kms_env: str) -> None:
    key_id = _create_kms_key()
    uri, pub = import_kms_key(key_id)
    assert uri == f"awskms:{key_id}"
    assert (pub.keytype, pub.scheme) == ("ecdsa", "ecdsa-sha2-nistp256")
    signer = load_signer(uri, pub)
    assert signer.public_key == pub
    sig = signer.sign(PAYLOAD)
    # AWSSigner sends sha256(PAYLOAD) with MessageType=DIGEST. moto 5.2.5 ignores MessageType
    # and hashes the digest again (getmoto/moto#10202), so its signature is over
    # sha256(sha256(PAYLOAD)). Verifying it against the digest proves that exactly our digest
    # reached KMS and that the signature is by the imported public key. Real KMS signs the digest
    # itself, so there pub.verify_signature(sig, PAYLOAD) holds; when moto is fixed, the first
    # assertion fails: switch it to that.
    with pytest.raises(UnverifiedSignatureError):
        pub.verify_signature(sig, PAYLOAD)
    pub.verify_signature(sig, hashlib.sha256(PAYLOAD).digest())


def test_kms_unknown_key_and_wrong_usage_are_config_errors(kms_env: str) -> None:
    with pytest.raises(ConfigError, match="NotFoundException"):
        import_kms_key("11111111-2222-3333-4444-555555555555")
    _, pub = import_kms_key(_create_kms_key())
    signer = load_signer("awskms:11111111-2222-3333-4444-555555555555", pub)
    with pytest.raises(ConfigError, match="NotFoundException") as exc:
        signer.sign(PAYLOAD)
    assert "kms:Sign" in exc.value.remedy
    with pytest.raises(ConfigError):
        import_kms_key(_create_kms_key("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT"))


def test_kms_unreachable_is_transient(kms_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _, pub = import_kms_key(_create_kms_key())
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", closed)
    signer = load_signer("awskms:alias/release", pub)
    with pytest.raises(TransientError):
        signer.sign(PAYLOAD)


def test_kms_without_region_is_a_config_error(
    kms_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.delenv("AWS_REGION", raising=False)
    pub = CryptoSigner.generate_ecdsa().public_key
    assert isinstance(pub, SSlibKey)
    with pytest.raises(ConfigError):
        load_signer("awskms:alias/release", pub)
    assert os.environ.get("AWS_DEFAULT_REGION") is None


def test_importing_ota_signing_stays_cheap() -> None:
    """model_signing and sigstore (about 0.5 s, network-capable) load only when used."""
    code = (
        "import sys, ota.signing; "
        "print(sorted(m for m in ('model_signing', 'sigstore') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
