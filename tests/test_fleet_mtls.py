"""Device certificates checked by a TLS proxy (``ota.fleet._mtls``): with the proxy secret
configured, a device request counts only when it carries the secret, a verified certificate
and a subject CN equal to the device it acts for; operator routes are untouched; without the
secret file the identity headers mean nothing."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from ota.fleet import FleetConfig, create_app, migrate
from ota.fleet._local import create_enroll_token, create_token
from ota.fleet._mtls import SECRET_ENV, MtlsConfigError, common_name
from tests import nginx

SECRET = "proxy-" + "s" * 40
FACTS = {
    "ring": "ga",
    "tier": "default",
    "arch": "x86_64",
    "runtime_version": "1.31.1",
    "client_version": "0.1.0",
}


@pytest.fixture
def cfg(tmp_path: Path) -> FleetConfig:
    url = f"sqlite:///{tmp_path / 'fleet.sqlite3'}"
    migrate(url)
    return FleetConfig(db_url=url)


@pytest.fixture
def client(cfg: FleetConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FlaskClient:
    secret = tmp_path / "proxy-secret"
    secret.write_text(SECRET + "\n")
    monkeypatch.setenv(SECRET_ENV, str(secret))
    return create_app(cfg).test_client()


def via_proxy(cn: str | None, *, verify: str = "SUCCESS", secret: str = SECRET) -> dict[str, str]:
    h = {"X-Ota-Proxy-Secret": secret, "X-Ota-Client-Verify": verify}
    if cn is not None:
        h["X-Ota-Client-Dn"] = f"CN={cn},O=Example Site"
    return h


def enrol(client: FlaskClient, cfg: FleetConfig, device_id: str, headers: dict[str, str]) -> Any:
    token = create_enroll_token(cfg, f"t-{device_id}", 1, 3600, "", "")["token"]
    return client.post(
        "/v1/enroll", json={"token": token, "device_id": device_id, "facts": FACTS}, headers=headers
    )


def err(r: Any) -> str:
    return str(r.json["error"])


def report(device_id: str) -> dict[str, Any]:
    return {
        "format": "edge-ota.report/1",
        "device": {"id": device_id, "models": {}},
        "queue": "q",
        "dropped": 0,
        "events": [
            {
                "seq": 1,
                "time": 1.0,
                "kind": "checked",
                "model": "det",
                "version": "1.0.0",
                "data": {},
            }
        ],
    }


def test_a_verified_certificate_acts_for_its_own_device_only(
    client: FlaskClient, cfg: FleetConfig
) -> None:
    r = enrol(client, cfg, "cam-1", via_proxy("cam-1"))
    assert r.status_code == 201, r.json
    cred = r.json["credential"]
    auth = {"Authorization": f"Bearer {cred}"}
    ok = client.post(
        "/v1/devices/cam-1/events", json=report("cam-1"), headers={**auth, **via_proxy("cam-1")}
    )
    assert ok.status_code == 200 and ok.json == {"ack": 1}

    refusals = [
        ({}, 401, "mtls_required"),  # straight to the service, around the proxy
        (via_proxy("cam-1", secret="x" * 46), 401, "mtls_required"),  # forged headers
        (via_proxy("cam-1", verify="FAILED:unable to verify"), 401, "mtls_required"),
        (via_proxy(None), 401, "mtls_required"),
        (via_proxy("cam-2"), 403, "mtls_identity"),  # another device's certificate
    ]
    for headers, status, reason in refusals:
        r = client.post(
            "/v1/devices/cam-1/events", json=report("cam-1"), headers={**auth, **headers}
        )
        assert (r.status_code, err(r)) == (status, reason), headers
    # the credential is still needed: a certificate alone is not enough
    r = client.post("/v1/devices/cam-1/events", json=report("cam-1"), headers=via_proxy("cam-1"))
    assert r.status_code == 401 and err(r) == "unauthorized"
    # a certificate for cam-1 cannot enrol cam-2 (the token stays unspent)
    r = enrol(client, cfg, "cam-2", via_proxy("cam-1"))
    assert r.status_code == 403 and err(r) == "mtls_identity"
    r = client.post("/v1/devices/cam-1/credential", json={}, headers={**auth, **via_proxy("cam-1")})
    assert r.status_code == 200 and r.get_json()["credential"] != cred


def test_operator_routes_are_untouched(client: FlaskClient, cfg: FleetConfig) -> None:
    admin = create_token(cfg, "adm", "admin", 3600)["token"]
    r = client.get("/v1/fleet", headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200, r.json


def test_without_the_secret_file_the_headers_mean_nothing(
    cfg: FleetConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    client = create_app(cfg).test_client()
    r = enrol(client, cfg, "cam-3", via_proxy("someone-else"))
    assert r.status_code == 201, r.json  # not mTLS mode: the token alone decides


def test_a_bad_secret_file_stops_the_service(
    cfg: FleetConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    short = tmp_path / "short"
    short.write_text("too-short")
    for path in (str(short), str(tmp_path / "missing")):
        monkeypatch.setenv(SECRET_ENV, path)
        with pytest.raises(MtlsConfigError):
            create_app(cfg)


@pytest.mark.parametrize(
    ("dn", "cn"),
    [
        ("CN=cam-1,O=Acme", "cam-1"),
        ("O=Acme,CN=cam-1", "cam-1"),
        ("O=Acme", None),
        ("CN=cam-1,CN=cam-2", None),
        ("CN=cam\\,1,O=Acme", None),
        ("CN=a+UID=b", None),
        ("CN=", None),
        ("CN=" + "x" * 2000, None),
    ],
)
def test_common_name_is_strict(dn: str, cn: str | None) -> None:
    assert common_name(dn) == cn


# --- the documented nginx set-up, for real ---------------------------------------------------


def _key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject_cn: str,
    key: Any,
    issuer: tuple[str, Any] | None,
    *,
    ca: bool = False,
    ip: str | None = None,
) -> Any:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, subject_cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Site"),
        ]
    )
    issuer_name, issuer_key = (
        (name, key)
        if issuer is None
        else (
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, issuer[0]),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Site"),
                ]
            ),
            issuer[1],
        )
    )
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ip:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False
        )
    return b.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, cert: Any, key: Any) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization

    c, k = folder / f"{name}.crt", folder / f"{name}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(c), str(k)


@pytest.mark.skipif(not nginx.available(), reason="nginx not installed (CI installs it)")
def test_the_documented_nginx_setup_verifies_device_certificates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    import subprocess

    import urllib3

    from ota.client._enroll import CA_ENV, CLIENT_CERT_ENV, CLIENT_KEY_ENV, ensure_enrolled
    from ota.client._state import DeviceConfig
    from tests.fleet_fixtures import call, free_port, new_db, start_service

    pki = tmp_path / "pki"
    pki.mkdir()
    ca_key, rogue_key = _key(), _key()
    ca = _cert("Device CA", ca_key, None, ca=True)
    ca_path, _ = _write(pki, "ca", ca, ca_key)
    server_key = _key()
    server = _write(
        pki,
        "server",
        _cert("127.0.0.1", server_key, ("Device CA", ca_key), ip="127.0.0.1"),
        server_key,
    )
    certs = {}
    for cn in ("cam-1", "cam-2"):
        k = _key()
        certs[cn] = _write(pki, cn, _cert(cn, k, ("Device CA", ca_key)), k)
    rk = _key()
    rogue = _write(pki, "rogue", _cert("cam-1", rk, ("Rogue CA", rogue_key)), rk)

    secret_file = tmp_path / "proxy-secret"
    secret_file.write_text(SECRET)
    include = tmp_path / "proxy-secret.conf"
    include.write_text(f'proxy_set_header X-Ota-Proxy-Secret "{SECRET}";\n')
    monkeypatch.setenv(SECRET_ENV, str(secret_file))  # the service inherits it
    db = new_db("sqlite", None, tmp_path)
    with start_service(db, workers=1) as svc:
        port = free_port()
        upstream = svc.url.removeprefix("http://")
        site = (Path(__file__).parents[1] / "docs" / "serving" / "fleet-mtls.conf").read_text()
        for k, v in {
            "@LISTEN@": f"127.0.0.1:{port}",
            "@SERVER_CERT@": server[0],
            "@SERVER_KEY@": server[1],
            "@DEVICE_CA@": ca_path,
            "@SECRET_INCLUDE@": str(include),
            "@UPSTREAM@": upstream,
        }.items():
            site = site.replace(k, v)
        work = tmp_path / "nginx"
        work.mkdir()
        (work / "site.conf").write_text(site)
        user = "user root;\n" if os.geteuid() == 0 else ""
        (work / "nginx.conf").write_text(
            f"{user}daemon off;\nworker_processes 1;\npid {work / 'nginx.pid'};\n"
            f"error_log {work / 'error.log'} warn;\nevents {{ worker_connections 64; }}\n"
            f"http {{\n access_log off;\n client_body_temp_path {work};\n"
            f" proxy_temp_path {work};\n include {work / 'site.conf'};\n}}\n"
        )
        exe = nginx.binary() or shutil.which("nginx") or "nginx"
        proc = subprocess.Popen(
            [exe, "-p", str(work), "-c", str(work / "nginx.conf"), "-e", str(work / "error.log")],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        fleet = f"https://127.0.0.1:{port}"
        try:
            _wait_tls(port, proc, work)
            # the real device client enrols through the proxy with its certificate
            monkeypatch.setenv(CA_ENV, ca_path)
            monkeypatch.setenv(CLIENT_CERT_ENV, certs["cam-1"][0])
            monkeypatch.setenv(CLIENT_KEY_ENV, certs["cam-1"][1])
            cfg = DeviceConfig(device_id="cam-1", repo_url="http://127.0.0.1:9", models=("det",))
            e = ensure_enrolled(tmp_path / "dev", cfg, fleet, svc.enroll_token())
            assert e.status == "enrolled" and e.warnings == ()
            cred = (tmp_path / "dev" / "fleet" / "credential").read_text().strip()

            def post(cert: tuple[str, str] | None, device: str = "cam-1") -> int:
                pool = urllib3.PoolManager(
                    ca_certs=ca_path,
                    retries=False,
                    cert_file=cert[0] if cert else None,
                    key_file=cert[1] if cert else None,
                )
                r = pool.request(
                    "POST",
                    f"{fleet}/v1/devices/{device}/events",
                    body=json.dumps(report(device)).encode(),
                    headers={"Content-Type": "application/json", "Authorization": f"Bearer {cred}"},
                )
                return r.status

            assert post(certs["cam-1"]) == 200
            assert post(certs["cam-2"]) == 403  # another device's certificate
            assert post(None) == 403  # no certificate: nginx refuses
            assert post(rogue) in (400, 403)  # signed by a CA the site does not trust
            # around the proxy, straight to the service: the forged headers count for nothing
            forged = call(
                "POST",
                f"{svc.url}/v1/devices/cam-1/events",
                report("cam-1"),
                token=cred,
                headers=via_proxy("cam-1", secret="f" * 46),
            )
            assert forged.status == 401
            # operators pass through without a certificate; identity headers never do
            r = urllib3.PoolManager(ca_certs=ca_path).request(
                "GET",
                f"{fleet}/v1/fleet",
                headers={"Authorization": f"Bearer {svc.admin_token}", **via_proxy("cam-1")},
            )
            assert r.status == 200
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)


def _wait_tls(port: int, proc: Any, work: Path) -> None:
    import socket
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, (work / "error.log").read_text(errors="replace")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise AssertionError("nginx did not listen in time")
