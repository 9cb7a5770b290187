"""A link a person can open to an object: a presigned GET URL on S3, a ``file://`` URI locally.

For the run's report in the Prefect UI: an art lead clicks it without credentials of their own.
A presigned URL is signed locally (no request is made) with the client's credentials; it stops
working at its expiry, or earlier when those credentials do (a role's session token).
"""

from __future__ import annotations

from vct.storage.s3 import s3_client
from vct.storage.uris import _local_path, _require_key, is_s3

MAX_LINK_EXPIRY_S = 7 * 24 * 3600
"""The longest a SigV4 presigned URL may live (S3 refuses longer ones): seven days."""


def share_link(uri: str, expires_s: int = MAX_LINK_EXPIRY_S) -> str:
    """A URL that opens the object at ``uri``: presigned for ``expires_s`` seconds on S3 (1 to
    :data:`MAX_LINK_EXPIRY_S`), the absolute ``file://`` URI of a local path."""
    if not is_s3(uri):
        return _local_path(uri).resolve().as_uri()
    if not 1 <= int(expires_s) <= MAX_LINK_EXPIRY_S:
        raise ValueError(f"link expiry must be 1 to {MAX_LINK_EXPIRY_S} s, got {expires_s}")
    bucket, key = _require_key(uri)
    return s3_client().generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=int(expires_s))
