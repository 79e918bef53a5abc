"""The device's light model-signature verifier: what it imports, and a differential corpus.

``verify_digests_light`` must accept exactly what upstream ``model_signing`` (through
``verify_digests``) accepts for our format, and refuse the rest. Tampered statements are re-signed
with the right key (a fresh ECDSA signature over the DSSE PAE), so each refusal proves a semantic
check, not only the signature check.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ota.errors import ConfigError, InputError, OtaError
from ota.signing import (
    SignatureError,
    SignerInfo,
    sign_bundle,
    sign_digests,
    verify_bundle,
    verify_digests,
    verify_digests_light,
)
from ota.signing._model_sig import MAX_SIGNATURE_BYTES

SIG = "model.sig"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
DIGESTS: dict[str, str] = {
    p: hashlib.sha256(p.encode()).hexdigest()
    for p in (
        "release.json",
        "model/model.onnx",
        "model/weights.bin",
        "model-b/x.bin",
        "smoke/inputs.npz",
        "sbom.cdx.json",
    )
}
HEAVY = (
    "model_signing",
    "sigstore",
    "sigstore_models",
    "sigstore_protobuf_specs",
    "google.protobuf",
    "pydantic",
    "pydantic_core",
    "requests",
    "in_toto_attestation",
    "rekor_types",
)
_CURVE_HASH: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}


@dataclass(frozen=True)
class Key:
    private: ec.EllipticCurvePrivateKey
    path: Path
    pem: bytes  # the public key, PEM SubjectPublicKeyInfo


@dataclass(frozen=True)
class Attempt:
    """What a verifier is given: a signature, the device's digests, the trusted key (PEM)."""

    signature: bytes
    digests: Mapping[str, str] = field(default_factory=lambda: DIGESTS)
    public_pem: bytes | None = None  # None: the trusted P-256 key


@dataclass(frozen=True)
class World:
    keys: Mapping[str, Key]
    sigs: Mapping[str, bytes]  # sign_digests(DIGESTS) by each key

    @property
    def sig(self) -> bytes:
        return self.sigs["p256"]

    def statement(self) -> dict[str, Any]:
        return _statement(self.sig)

    def edit(self, change: Callable[[dict[str, Any]], object], *, fix_root: bool = True) -> bytes:
        """The trusted signature's statement, changed, then re-signed by the trusted key."""
        statement = self.statement()
        change(statement)
        if fix_root:
            _fix_root(statement)
        return _resign(self.sig, json.dumps(statement).encode(), self.keys["p256"].private)

    def envelope(self, change: Callable[[dict[str, Any]], object], sig: bytes = b"") -> bytes:
        """The trusted signature's outer JSON, changed (no new signature)."""
        doc = json.loads(sig or self.sig)
        change(doc)
        return json.dumps(doc).encode()


# -- helpers -------------------------------------------------------------------------------


def _keypair(folder: Path, name: str, curve: ec.EllipticCurve) -> Key:
    private = ec.generate_private_key(curve)
    path = folder / f"{name}.pem"
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Key(private, path, pem)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _statement(sig: bytes) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(
        base64.b64decode(json.loads(sig)["dsseEnvelope"]["payload"])
    )
    return result


def _pae(payload: bytes, payload_type: str = PAYLOAD_TYPE) -> bytes:
    """DSSE v1 pre-authentication encoding, written from the spec (independent of the code)."""
    return b"DSSEv1 %d %b %d %b" % (
        len(payload_type.encode()),
        payload_type.encode(),
        len(payload),
        payload,
    )


def _sign(private: ec.EllipticCurvePrivateKey, data: bytes, hash_name: str = "") -> str:
    algorithm = _CURVE_HASH[hash_name or private.curve.name]()
    return _b64(private.sign(data, ec.ECDSA(algorithm)))


def _resign(
    sig: bytes,
    payload: bytes,
    private: ec.EllipticCurvePrivateKey,
    *,
    pae: bytes | None = None,
    hash_name: str = "",
) -> bytes:
    doc = json.loads(sig)
    doc["dsseEnvelope"]["payload"] = _b64(payload)
    signed = _pae(payload) if pae is None else pae
    doc["dsseEnvelope"]["signatures"] = [{"sig": _sign(private, signed, hash_name), "keyid": ""}]
    return json.dumps(doc).encode()


def _fix_root(statement: dict[str, Any]) -> None:
    """Recompute the subject digest as model_signing does (sha256 over the raw digests)."""
    hasher = hashlib.sha256()
    for r in statement["predicate"]["resources"]:
        hasher.update(bytes.fromhex(r["digest"]))
    statement["subject"][0]["digest"]["sha256"] = hasher.hexdigest()


def _resources(statement: dict[str, Any]) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = statement["predicate"]["resources"]
    return result


def _serialization(statement: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = statement["predicate"]["serialization"]
    return result


_DELETE = object()


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    """A change setting a '/'-separated key path of a JSON document (digits index lists)."""

    def change(doc: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is _DELETE:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value

    return change


def _verify(verify: Callable[..., SignerInfo], world: World, attempt: Attempt) -> SignerInfo:
    return verify(
        attempt.signature,
        attempt.public_pem or world.keys["p256"].pem,
        attempt.digests,
        signature_name=SIG,
    )


_R = Callable[[World], Attempt]  # builds one attempt of the corpus


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    folder = tmp_path_factory.mktemp("light-keys")
    keys = {
        "p256": _keypair(folder, "p256", ec.SECP256R1()),
        "p384": _keypair(folder, "p384", ec.SECP384R1()),
        "p521": _keypair(folder, "p521", ec.SECP521R1()),
        "other": _keypair(folder, "other", ec.SECP256R1()),
    }
    sigs = {}
    for name, key in keys.items():
        out = folder / name / "resnet-1.0.0" / SIG
        sign_digests(DIGESTS, key.path, out, signature_name=SIG)
        sigs[name] = out.read_bytes()
    return World(keys, sigs)


# -- 1. imports and memory -----------------------------------------------------------------

_PROBE = r"""
import json, sys
sys.modules["boto3"] = None  # a device without the publisher's extras

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

import securesystemslib.signer, tuf.ngclient  # what the device updater has loaded anyway
before = rss_kib()
if sys.argv[1] == "light":
    from ota.signing._light_verify import verify_digests_light
    case = json.loads(open(sys.argv[2]).read())
    info = verify_digests_light(
        case["sig"].encode(), case["pem"].encode(), case["digests"], signature_name="model.sig"
    )
    assert dict(info.files) == case["digests"]
else:
    import model_signing.verifying
heavy = json.loads(sys.argv[3])
loaded = sorted(
    m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in heavy)
)
print(json.dumps({"kib": rss_kib() - before, "loaded": loaded}))
"""


def _probe(mode: str, case: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode, str(case), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    return result


def test_light_verifier_imports_no_heavy_module_and_costs_little_rss(
    world: World, tmp_path: Path
) -> None:
    case = tmp_path / "case.json"
    case.write_text(
        json.dumps(
            {"sig": world.sig.decode(), "pem": world.keys["p256"].pem.decode(), "digests": DIGESTS}
        )
    )
    light, upstream = _probe("light", case), _probe("upstream", case)
    print(
        f"RSS cost over tuf+securesystemslib: verify_digests_light (import + one call) "
        f"{light['kib'] / 1024:.1f} MiB; import model_signing.verifying "
        f"{upstream['kib'] / 1024:.1f} MiB"
    )
    assert light["loaded"] == []
    assert "model_signing" in upstream["loaded"]  # the probe does see the heavy stack
    assert light["kib"] < upstream["kib"]


# -- 2. both verifiers accept our signatures, with the same answer --------------------------


def _fingerprint(pem: bytes) -> str:
    der = serialization.load_pem_public_key(pem).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


@pytest.mark.parametrize("curve", ["p256", "p384", "p521"])
def test_both_accept_sign_digests_and_agree(world: World, curve: str) -> None:
    attempt = Attempt(world.sigs[curve], public_pem=world.keys[curve].pem)
    upstream = _verify(verify_digests, world, attempt)
    light = _verify(verify_digests_light, world, attempt)
    assert light == upstream
    assert dict(light.files) == DIGESTS
    assert light.key_fingerprint == _fingerprint(world.keys[curve].pem)
    assert light.model_name == "resnet-1.0.0"


ACCEPTED: dict[str, _R] = {
    # the test's own re-signing is valid: the refusals below are semantic, not a bad signature
    "resigned-unchanged": lambda w: Attempt(w.edit(lambda s: None)),
    # upstream hashes the resources in the order they are signed, not sorted
    "resources-reordered": lambda w: Attempt(w.edit(lambda s: _resources(s).reverse())),
    "no-tlog-entries-field": lambda w: Attempt(
        w.envelope(_set("verificationMaterial/tlogEntries", _DELETE))
    ),
    "no-keyid": lambda w: Attempt(w.envelope(_set("dsseEnvelope/signatures/0/keyid", _DELETE))),
    "other-model-name": lambda w: Attempt(w.edit(_set("subject/0/name", "renamed"))),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_both_accept_equivalent_variants(world: World, case: str) -> None:
    attempt = ACCEPTED[case](world)
    assert _verify(verify_digests_light, world, attempt) == _verify(verify_digests, world, attempt)


# -- 3. the differential corpus: both refuse -----------------------------------------------


def _edited_payload_old_signature(w: World) -> Attempt:
    """An attacker edits the statement to match a changed file but cannot sign it."""
    statement = w.statement()
    _resources(statement)[0]["digest"] = "ab" * 32
    _fix_root(statement)
    sig = w.envelope(_set("dsseEnvelope/payload", _b64(json.dumps(statement).encode())))
    return Attempt(sig, digests=dict(DIGESTS, **{_resources(statement)[0]["name"]: "ab" * 32}))


def _forge_hint(w: World, sig: bytes) -> bytes:
    trusted_hint = json.loads(w.sig)["verificationMaterial"]["publicKey"]["hint"]
    return w.envelope(_set("verificationMaterial/publicKey/hint", trusted_hint), sig)


def _foreign_then_valid(w: World) -> Attempt:
    doc = json.loads(w.sig)
    payload = base64.b64decode(doc["dsseEnvelope"]["payload"])
    foreign = {"sig": _sign(w.keys["other"].private, _pae(payload)), "keyid": ""}
    doc["dsseEnvelope"]["signatures"].insert(0, foreign)
    return Attempt(json.dumps(doc).encode())


def _flip_bit(w: World) -> Attempt:
    doc = json.loads(w.sig)
    raw = bytearray(base64.b64decode(doc["dsseEnvelope"]["signatures"][0]["sig"]))
    raw[len(raw) // 2] ^= 0x01
    doc["dsseEnvelope"]["signatures"][0]["sig"] = _b64(bytes(raw))
    return Attempt(json.dumps(doc).encode())


def _payload_type_changed_and_signed(w: World) -> Attempt:
    payload = base64.b64decode(json.loads(w.sig)["dsseEnvelope"]["payload"])
    sig = _resign(w.sig, payload, w.keys["p256"].private, pae=_pae(payload, "application/json"))
    return Attempt(w.envelope(_set("dsseEnvelope/payloadType", "application/json"), sig))


def _wrong_hash_for_curve(w: World) -> Attempt:
    """A P-384 key signing with SHA-256: upstream pairs P-384 with SHA-384 only."""
    payload = base64.b64decode(json.loads(w.sigs["p384"])["dsseEnvelope"]["payload"])
    sig = _resign(w.sigs["p384"], payload, w.keys["p384"].private, hash_name="secp256r1")
    return Attempt(sig, public_pem=w.keys["p384"].pem)


def _message_signature(w: World) -> Attempt:
    def change(doc: dict[str, Any]) -> None:
        envelope = doc.pop("dsseEnvelope")
        doc["messageSignature"] = {"signature": envelope["signatures"][0]["sig"]}

    return Attempt(w.envelope(change))


def _oversize(w: World) -> Attempt:
    return Attempt(w.sig + b" " * (MAX_SIGNATURE_BYTES + 1 - len(w.sig)))


def _public_pem(key: Any) -> bytes:
    pem: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem


_SHARDS = {"method": "shards", "hash_type": "sha256", "shard_size": 1_000_000}
_EXTRA = {"name": "model/extra.bin", "algorithm": "sha256", "digest": "1" * 64}
_FIRST = "release.json"

REFUSED: dict[str, _R] = {  # both verifiers raise SignatureError
    # the statement, edited and re-signed by the trusted key (unless said otherwise)
    "payload-edited-not-resigned": _edited_payload_old_signature,
    "predicate-type-v2": lambda w: Attempt(
        w.edit(_set("predicateType", "https://model_signing/signature/v2.0"))
    ),
    "predicate-type-compat-v0.1": lambda w: Attempt(
        w.edit(_set("predicateType", "https://model_signing/Digests/v0.1"))
    ),
    "statement-type": lambda w: Attempt(w.edit(_set("_type", "https://in-toto.io/Statement/v0.1"))),
    "extra-resource": lambda w: Attempt(w.edit(lambda s: _resources(s).append(dict(_EXTRA)))),
    "missing-resource": lambda w: Attempt(w.edit(lambda s: _resources(s).pop())),
    "changed-resource-digest": lambda w: Attempt(
        w.edit(_set("predicate/resources/0/digest", "2" * 64))
    ),
    "renamed-resource": lambda w: Attempt(
        w.edit(_set("predicate/resources/0/name", "renamed.bin"))
    ),
    "resource-algorithm-sha512": lambda w: Attempt(
        w.edit(_set("predicate/resources/0/algorithm", "sha512"))
    ),
    "resource-digest-uppercase": lambda w: Attempt(
        w.edit(lambda s: _resources(s)[0].update(digest=_resources(s)[0]["digest"].upper()))
    ),
    "duplicate-resource": lambda w: Attempt(
        w.edit(lambda s: _resources(s).append(dict(_resources(s)[0])))
    ),
    # upstream's PurePosixPath normalises "./x" to "x"; only the file-set check catches it there
    "dot-slash-resource-name": lambda w: Attempt(
        w.edit(lambda s: _resources(s)[0].update(name="./" + _resources(s)[0]["name"]))
    ),
    "subject-digest-mismatch": lambda w: Attempt(
        w.edit(_set("subject/0/digest/sha256", "0" * 64), fix_root=False)
    ),
    "two-subjects": lambda w: Attempt(
        w.edit(lambda s: s["subject"].append(copy.deepcopy(s["subject"][0])))
    ),
    "serialization-shards": lambda w: Attempt(w.edit(lambda s: _serialization(s).update(_SHARDS))),
    "serialization-unknown-method": lambda w: Attempt(
        w.edit(_set("predicate/serialization/method", "tensors"))
    ),
    "hash-type-blake2": lambda w: Attempt(
        w.edit(_set("predicate/serialization/hash_type", "blake2"))
    ),
    "no-predicate-resources": lambda w: Attempt(
        w.edit(_set("predicate/resources", _DELETE), fix_root=False)
    ),
    "signed-payload-not-json": lambda w: Attempt(
        _resign(w.sig, b"not json", w.keys["p256"].private)
    ),
    # keys
    "wrong-key": lambda w: Attempt(w.sigs["other"]),
    "wrong-key-forged-hint": lambda w: Attempt(_forge_hint(w, w.sigs["other"])),
    "key-on-another-curve": lambda w: Attempt(w.sigs["p384"]),
    "key-on-another-curve-forged-hint": lambda w: Attempt(_forge_hint(w, w.sigs["p384"])),
    "wrong-hash-for-curve": _wrong_hash_for_curve,
    # the envelope and the bundle around it
    "signature-bit-flip": _flip_bit,
    "two-signatures-foreign-first": _foreign_then_valid,
    "no-signatures": lambda w: Attempt(w.envelope(_set("dsseEnvelope/signatures", []))),
    "payload-type-changed": lambda w: Attempt(
        w.envelope(_set("dsseEnvelope/payloadType", "application/json"))
    ),
    "payload-type-changed-and-signed": _payload_type_changed_and_signed,
    "bad-base64-payload": lambda w: Attempt(w.envelope(_set("dsseEnvelope/payload", "%%%%"))),
    "bad-base64-signature": lambda w: Attempt(
        w.envelope(_set("dsseEnvelope/signatures/0/sig", "%%%%"))
    ),
    "not-json": lambda w: Attempt(b"not json"),
    "empty": lambda w: Attempt(b""),
    "json-array": lambda w: Attempt(b"[1]"),
    "many-json-elements": lambda w: Attempt(b"[" + b"{}," * 300_000 + b"{}]"),
    "oversize": _oversize,
    "media-type-changed": lambda w: Attempt(
        w.envelope(_set("mediaType", "application/vnd.dev.sigstore.bundle+json;version=0.3"))
    ),
    "unknown-bundle-field": lambda w: Attempt(w.envelope(_set("extra", 1))),
    "unknown-envelope-field": lambda w: Attempt(w.envelope(_set("dsseEnvelope/extra", 1))),
    "message-signature-not-dsse": _message_signature,
    # the device's digests against a valid signature
    "digests-extra-file": lambda w: Attempt(
        w.sig, digests=dict(DIGESTS, **{"model/extra.bin": "1" * 64})
    ),
    "digests-missing-file": lambda w: Attempt(
        w.sig, digests={k: v for k, v in DIGESTS.items() if k != _FIRST}
    ),
    "digests-changed-value": lambda w: Attempt(w.sig, digests=dict(DIGESTS, **{_FIRST: "0" * 64})),
    "digests-renamed-file": lambda w: Attempt(
        w.sig, digests={("renamed.json" if k == _FIRST else k): v for k, v in DIGESTS.items()}
    ),
}

_SECT163K1_PEM = b"""-----BEGIN PUBLIC KEY-----
MEAwEAYHKoZIzj0CAQYFK4EEAAEDLAAEB+geGRd7ofRcZeJt5679j4LszSg2AU3r
GyEZUyHp9tG52s5tQgQxpLbl
-----END PUBLIC KEY-----
"""


BAD_INPUT: dict[str, tuple[_R, type[OtaError]]] = {
    "digests-empty": (lambda w: Attempt(w.sig, digests={}), InputError),
    "digests-name-the-signature": (
        lambda w: Attempt(w.sig, digests=dict(DIGESTS, **{SIG: "0" * 64})),
        InputError,
    ),
    "digests-bad-hex": (
        lambda w: Attempt(w.sig, digests=dict(DIGESTS, **{_FIRST: "XY"})),
        InputError,
    ),
    "digests-unsafe-path": (
        lambda w: Attempt(w.sig, digests=dict(DIGESTS, **{"../x": "0" * 64})),
        InputError,
    ),
    "ed25519-public-key": (
        lambda w: Attempt(w.sig, public_pem=_public_pem(ed25519.Ed25519PrivateKey.generate())),
        ConfigError,
    ),
    "secp256k1-public-key": (
        lambda w: Attempt(w.sig, public_pem=_public_pem(ec.generate_private_key(ec.SECP256K1()))),
        ConfigError,
    ),
    "not-a-public-key": (lambda w: Attempt(w.sig, public_pem=b"not a key"), ConfigError),
    # a binary-field curve cryptography cannot load (UnsupportedAlgorithm): once escaped as a
    # crash, so a bad key in trust/signers.json blocked every signer after it (review finding)
    "sect163k1-public-key": (lambda w: Attempt(w.sig, public_pem=_SECT163K1_PEM), ConfigError),
}
_EXPECTED = {**{name: (build, SignatureError) for name, build in REFUSED.items()}, **BAD_INPUT}


@pytest.mark.parametrize("case", sorted(_EXPECTED))
def test_both_verifiers_refuse(world: World, case: str) -> None:
    build, expected = _EXPECTED[case]
    attempt = build(world)
    with pytest.raises(expected):
        _verify(verify_digests, world, attempt)
    with pytest.raises(expected):
        _verify(verify_digests_light, world, attempt)


# -- 4. where upstream is lenient, the light verifier refuses (stricter, never looser) -------


def _two_valid_signatures(w: World) -> Attempt:
    doc = json.loads(w.sig)
    doc["dsseEnvelope"]["signatures"] *= 2
    return Attempt(json.dumps(doc).encode())


def _pre_1_0_pae(w: World) -> Attempt:
    """model_signing < 1.0 signed a buggy PAE; upstream still accepts it, we do not."""
    payload = base64.b64decode(json.loads(w.sig)["dsseEnvelope"]["payload"])
    pae = f"DSSEV1 {len(PAYLOAD_TYPE)} {PAYLOAD_TYPE} {len(payload)} {payload!r}".encode()
    return Attempt(_resign(w.sig, payload, w.keys["p256"].private, pae=pae))


def _base64_with_newline(w: World) -> Attempt:
    doc = json.loads(w.sig)
    sig = doc["dsseEnvelope"]["signatures"][0]["sig"]
    doc["dsseEnvelope"]["signatures"][0]["sig"] = sig[:20] + "\n" + sig[20:]
    return Attempt(json.dumps(doc).encode())


STRICTER: dict[str, _R] = {
    "ignore-paths-widened": lambda w: Attempt(
        w.edit(_set("predicate/serialization/ignore_paths", [SIG, "model"]))
    ),
    "ignore-paths-other-name": lambda w: Attempt(
        w.edit(_set("predicate/serialization/ignore_paths", ["other.sig"]))
    ),
    "ignore-paths-removed": lambda w: Attempt(
        w.edit(_set("predicate/serialization/ignore_paths", _DELETE))
    ),
    "allow-symlinks-true": lambda w: Attempt(
        w.edit(_set("predicate/serialization/allow_symlinks", True))
    ),
    "unknown-predicate-field": lambda w: Attempt(w.edit(_set("predicate/extra", 1))),
    "unknown-statement-field": lambda w: Attempt(w.edit(_set("extra", 1))),
    "subject-digest-extra-algorithm": lambda w: Attempt(
        w.edit(_set("subject/0/digest/sha512", "00" * 64))
    ),
    "two-valid-signatures": _two_valid_signatures,
    "pre-1.0-pae": _pre_1_0_pae,
    "key-hint-missing": lambda w: Attempt(
        w.envelope(_set("verificationMaterial/publicKey/hint", _DELETE))
    ),
    "keyid-set": lambda w: Attempt(w.envelope(_set("dsseEnvelope/signatures/0/keyid", "k1"))),
    "signature-base64-with-newline": _base64_with_newline,
    "duplicate-json-key": lambda w: Attempt(
        w.sig.replace(b'{"mediaType":', b'{"mediaType":"bogus","mediaType":', 1)
    ),
    "snake-case-alias": lambda w: Attempt(
        w.envelope(lambda d: d.update(media_type=d.pop("mediaType")))
    ),
}


@pytest.mark.parametrize("case", sorted(STRICTER))
def test_light_refuses_what_upstream_tolerates(world: World, case: str) -> None:
    attempt = STRICTER[case](world)
    assert dict(_verify(verify_digests, world, attempt).files) == DIGESTS  # upstream accepts
    with pytest.raises(SignatureError):
        _verify(verify_digests_light, world, attempt)


def test_deeply_nested_json_is_a_signature_error(world: World) -> None:
    """Deep nesting is refused before parsing by the light verifier; the upstream path maps the
    parser's RecursionError to a SignatureError too."""
    attempt = Attempt(b"[" * 100_000)
    with pytest.raises(SignatureError, match="too many JSON elements"):
        _verify(verify_digests_light, world, attempt)
    with pytest.raises(SignatureError):
        _verify(verify_digests, world, attempt)


# -- 5. signatures made by upstream's own signing path on a real folder --------------------


def _folder(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "detector-2.0.0"
    files = {"model/model.onnx": b"onnx" * 1000, "release.json": b"{}", "smoke/a.npz": b"a"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root, {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}


def test_sign_bundle_on_a_folder_verifies_light(world: World, tmp_path: Path) -> None:
    root, digests = _folder(tmp_path)
    key = world.keys["p384"]
    sign_bundle(root, key.path)
    info = verify_digests_light((root / SIG).read_bytes(), key.pem, digests, signature_name=SIG)
    assert info == verify_bundle(root, key.pem)
    assert info.model_name == "detector-2.0.0"
    with pytest.raises(SignatureError, match=r"changed release\.json"):
        verify_digests_light(
            (root / SIG).read_bytes(),
            key.pem,
            dict(digests, **{"release.json": "0" * 64}),
            signature_name=SIG,
        )


def test_upstream_cli_signature_verifies_light(world: World, tmp_path: Path) -> None:
    root, digests = _folder(tmp_path)
    key = world.keys["p256"]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "model_signing",
            "sign",
            "key",
            str(root),
            "--signature",
            str(root / SIG),
            "--private_key",
            str(key.path),
            "--no-ignore-git-paths",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    info = verify_digests_light((root / SIG).read_bytes(), key.pem, digests, signature_name=SIG)
    assert info == verify_digests((root / SIG).read_bytes(), key.pem, digests, signature_name=SIG)
