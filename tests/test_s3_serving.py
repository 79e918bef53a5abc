"""An ``s3://`` repository served straight from its bucket: the same cache rules and the same
privacy as ``ota serve``.

A real publish to moto, then every object in the bucket is checked against the documented
bucket policy (``docs/serving/s3-bucket-policy.json``) and against ``ota serve`` serving a copy
of the same objects: what the policy makes public is exactly what ``ota serve`` serves (the audit
log with its actors and waiver reasons is not), and each object carries the ``Cache-Control``
that ``ota serve`` sends for it. moto does not enforce bucket policies for anonymous requests, so
the policy's effect is evaluated here from its documented resource patterns (AWS matches
``*`` across ``/``, as :func:`fnmatch.fnmatchcase` does); moto checks only that S3 accepts it.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import boto3
import pytest

from ota.repository._storage import cache_control
from tests.repo_helpers import make_project, publish_mlp

POLICY = Path(__file__).resolve().parents[1] / "docs" / "serving" / "s3-bucket-policy.json"


def policy_for(bucket: str, prefix: str) -> dict[str, Any]:
    """The documented policy, filled in as the serving guide says."""
    text = POLICY.read_text(encoding="utf-8")
    doc: dict[str, Any] = json.loads(
        text.replace("@BUCKET@", bucket).replace("@PREFIX@", f"{prefix}/" if prefix else "")
    )
    return doc


def public(policy: dict[str, Any], bucket: str, key: str) -> bool:
    """Whether an anonymous GET of ``key`` is allowed (no Deny statements are documented)."""
    arn = f"arn:aws:s3:::{bucket}/{key}"
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow" and st["Principal"] == "*"
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        if "s3:GetObject" in actions and any(fnmatch.fnmatchcase(arn, r) for r in st["Resource"]):
            return True
    return False


@pytest.fixture(scope="module")
def published(
    tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str
) -> tuple[str, dict[str, dict[str, Any]]]:
    """A moto bucket after init and two publishes; yields (bucket, {key: head_object})."""
    import uuid

    base = tmp_path_factory.mktemp("s3serve")
    bucket = f"ota-serve-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=bucket)
    project = make_project(base, f"s3://{bucket}/repo", s3_endpoint=s3_endpoint)
    publish_mlp(project, "m", "1.0.0")
    publish_mlp(project, "m", "1.1.0", seed=1)
    heads: dict[str, dict[str, Any]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", ()):
            heads[obj["Key"]] = client.head_object(Bucket=bucket, Key=obj["Key"])
    return bucket, heads


def test_uploads_carry_the_cache_rules_of_ota_serve(
    published: tuple[str, dict[str, dict[str, Any]]],
) -> None:
    _bucket, heads = published
    rel = {key.removeprefix("repo/"): head for key, head in heads.items()}
    assert rel["metadata/timestamp.json"]["CacheControl"] == "no-cache"
    assert rel["metadata/root.json"]["CacheControl"] == "no-cache"
    assert rel["metadata/1.root.json"]["CacheControl"].endswith("immutable")
    snapshots = [k for k in rel if k.endswith(".snapshot.json") and k[9:10].isdigit()]
    assert snapshots and all(rel[k]["CacheControl"].endswith("immutable") for k in snapshots)
    blobs = [k for k in rel if k.startswith("blobs/")]
    assert blobs and all("max-age=31536000" in rel[k]["CacheControl"] for k in blobs)
    audit = [k for k in rel if k.startswith("audit/")]
    assert audit and all(rel[k]["CacheControl"] == "private, no-store" for k in audit)
    for key, head in rel.items():
        assert head.get("CacheControl") == cache_control(key), key


def test_the_bucket_policy_publishes_what_ota_serve_serves_and_hides_the_audit_log(
    published: tuple[str, dict[str, dict[str, Any]]], s3_endpoint: str, tmp_path: Path
) -> None:
    from ota.repository._serve import create_app

    bucket, heads = published
    policy = policy_for(bucket, "repo")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))  # S3 accepts it
    assert json.loads(client.get_bucket_policy(Bucket=bucket)["Policy"]) == policy

    # The same objects in a folder, served by `ota serve`.
    for key in heads:
        path = tmp_path / key.removeprefix("repo/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    app = create_app(tmp_path).test_client()
    areas: dict[str, set[bool]] = {}
    for key in heads:
        rel = key.removeprefix("repo/")
        with app.get(f"/{rel}") as response:
            served = response.status_code == 200
            if served:  # the same directives (ota serve adds max-age=0 beside no-cache)
                sent = {d.strip() for d in response.headers["Cache-Control"].split(",")}
                assert {d.strip() for d in cache_control(rel).split(",")} <= sent, rel
        assert public(policy, bucket, key) == served, key
        areas.setdefault(rel.split("/", 1)[0], set()).add(served)
    # Every area is entirely public or entirely private, and each kind was seen.
    assert areas == {
        "metadata": {True},
        "targets": {True},
        "blobs": {True},
        "audit": {False},
        "_ota": {False},
    }


def test_the_policy_does_not_reach_another_prefix_or_the_listing() -> None:
    policy = policy_for("b", "repo")
    assert public(policy, "b", "repo/metadata/timestamp.json")
    assert not public(policy, "b", "repo/audit/log/000000000001.json")
    assert not public(policy, "b", "repo/audit/head.json")
    assert not public(policy, "b", "repo/_ota/conditional-writes.json")
    assert not public(policy, "b", "other/metadata/timestamp.json")
    assert not public(policy, "b", "repo-other/metadata/timestamp.json")
    actions = {a for st in policy["Statement"] for a in [st["Action"]]}
    assert actions == {"s3:GetObject"}  # no ListBucket: key names stay private too
    root = policy_for("b", "")
    assert public(root, "b", "blobs/sha256/ab/cd")
    assert not public(root, "b", "audit/log/000000000001.json")
