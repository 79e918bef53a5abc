"""Device certificates checked by a TLS proxy (``ota.fleet._mtls``): with the proxy secret
configured, a device request counts only when it carries the secret, a verified certificate
and a subject CN equal to the device it acts for; operator routes are untouched; without the
secret file the identity headers mean nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from ota.fleet import FleetConfig, create_app, migrate
from ota.fleet._local import create_enroll_token, create_token
from ota.fleet._mtls import SECRET_ENV, MtlsConfigError, common_name

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
