"""How S3 failures reach the caller: boto3/botocore exceptions mapped by who must react.

Connection failures, timeouts, 5xx and throttling are :class:`TransientError` (exit 5); a missing
bucket, refused credentials, an unimplemented request or a bad endpoint are :class:`ConfigError`
(exit 9); a missing key is :class:`NotFound`; any other refusal is :class:`StorageError` (exit 9).
"""

from __future__ import annotations

from typing import NoReturn

import botocore.exceptions as bex

from ota.errors import ConfigError, TransientError
from ota.repository._storage import NotFound, StorageError

_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "BadGateway",
        "GatewayTimeout",
    }
)
_CREDENTIAL_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AccountProblem",
        "403",
    }
)


def raise_mapped(
    e: Exception, key: str, where: str, endpoint: str, no_bucket: ConfigError
) -> NoReturn:
    """Raise the caller-facing error for ``e`` (from ``e``) about ``key``, named ``where``."""
    if isinstance(e, bex.ClientError):
        code = error_code(e)
        status = _status(e)
        if code == "NoSuchBucket":
            raise no_bucket from e
        if code in ("NoSuchKey", "404") or (status == 404 and code != "NoSuchUpload"):
            raise NotFound(key) from e
        if code in _CREDENTIAL_CODES or status == 403:
            raise ConfigError(
                f"S3 refused access to {where} ({code})",
                remedy="check the AWS credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID) and that "
                "they allow s3:GetObject, s3:PutObject, s3:DeleteObject and s3:ListBucket",
            ) from e
        if code == "NotImplemented" or status == 501:
            raise ConfigError(
                f"the S3 endpoint {endpoint} does not implement a request on {where}",
                remedy="use a store with conditional writes (If-Match, If-None-Match): "
                "AWS S3 honours them; any other store is probed on first use "
                "(docs/runbooks/publish.md)",
            ) from e
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            raise TransientError(
                f"S3 failed on {where} ({code}, HTTP {status})", remedy="retry later"
            ) from e
        raise StorageError(f"S3 error on {where}: {code}: {_message(e)}") from e
    if isinstance(e, bex.NoCredentialsError | bex.PartialCredentialsError):
        raise ConfigError(
            f"no usable AWS credentials for {where}: {e}",
            remedy="set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "or run on a machine with an instance role",
        ) from e
    if isinstance(e, bex.ParamValidationError):
        raise ConfigError(f"bad S3 request for {where}: {e}") from e
    if isinstance(e, bex.ConnectionError | bex.HTTPClientError):
        raise TransientError(
            f"S3 endpoint {endpoint} unreachable or failed for {where}: {e}",
            remedy="check the network and AWS_ENDPOINT_URL, then retry",
        ) from e
    if isinstance(e, bex.BotoCoreError):
        raise StorageError(f"S3 client error on {where}: {e}") from e
    raise e


def bad_endpoint(url: str | None) -> ConfigError:
    return ConfigError(
        f"bad S3 endpoint URL {url!r}",
        remedy="use an http(s) URL such as https://s3.example.com, or unset AWS_ENDPOINT_URL",
    )


def etag(value: str) -> str:
    """The etag in the form this backend hands out: S3's ETag without its quotes."""
    return value.strip().removeprefix("W/").strip('"')


def error_code(e: Exception) -> str:
    if isinstance(e, bex.ClientError):
        return str(e.response.get("Error", {}).get("Code", ""))
    return ""


def _status(e: bex.ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _message(e: bex.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Message", "")) or str(e)
