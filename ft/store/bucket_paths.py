"""`gs://` and `s3://` backup directories: parsing, the path layer, TensorStore's kvstore.

Two layers reach a bucket, each through the library that does it best:

- metadata, records, markers, leases, listing and deletion go through fsspec
  (`gcsfs` for `gs://`, `s3fs` for `s3://`): one API for both schemes, with
  create-if-absent writes (`mode="create"`: S3 `If-None-Match: *`, GCS
  `ifGenerationMatch=0`) and each object's size from a listing;
- arrays go through TensorStore's own `gcs` and `s3` kvstore drivers
  (`bucket_arrays`).

Credentials and endpoints come from the usual places only: Google's
application default credentials (`GOOGLE_APPLICATION_CREDENTIALS`, the
metadata server), AWS's chain (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`,
`~/.aws`, the instance role), `AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL` and
`AWS_REGION`/`AWS_DEFAULT_REGION` for S3-compatible servers,
`STORAGE_EMULATOR_HOST` (gcsfs) and `TENSORSTORE_GCS_HTTP_URL` (TensorStore)
for another GCS endpoint. ft has no settings of its own for them; it only
hands TensorStore's `s3` driver the endpoint and region from those AWS
variables, since that driver does not read them itself, and gcsfs TensorStore's
GCS endpoint (with `GOOGLE_AUTH_TOKEN_FOR_TESTING`) when `STORAGE_EMULATOR_HOST`
is not set, so that one variable points both layers at the same server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ft import errors

SCHEMES = {"gs": ("gcsfs", "gcs"), "s3": ("s3fs", "s3")}


@dataclass(frozen=True)
class BucketURL:
    """A bucket prefix, such as `s3://my-bucket/runs/42` (no trailing slash)."""

    scheme: str
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> BucketURL:
        """Parse `gs://bucket/prefix` or `s3://bucket/prefix`.

        Raises:
            ValueError: naming what is wrong with `url`.
        """
        scheme, _, rest = url.partition("://")
        scheme = scheme.lower()
        if scheme not in SCHEMES:
            raise ValueError(
                f"Invalid value for argument `backup_dir`. Received: backup_dir={url!r}. "
                f"Expected a local or network path, or a gs:// or s3:// URL; the "
                f"scheme {scheme!r} is not supported."
            )
        bucket, _, prefix = rest.partition("/")
        prefix = prefix.strip("/")
        if not bucket:
            raise ValueError(
                f"Invalid value for argument `backup_dir`. Received: backup_dir={url!r}. "
                f"Expected {scheme}://BUCKET/PREFIX, with the bucket's name."
            )
        if any(part in (".", "..") for part in prefix.split("/")):
            raise ValueError(
                f"Invalid value for argument `backup_dir`. Received: backup_dir={url!r}. "
                "Expected a prefix without '.' or '..' parts."
            )
        return cls(scheme, bucket, prefix)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")

    def key(self, *parts: str) -> str:
        """The object key (inside the bucket) of `parts` below this prefix."""
        return "/".join(p for p in (self.prefix, *parts) if p)

    def fs_path(self, *parts: str) -> str:
        """The fsspec path (`bucket/key`) of `parts` below this prefix."""
        return f"{self.bucket}/{self.key(*parts)}".rstrip("/")

    def child_url(self, *parts: str) -> str:
        return f"{self.scheme}://{self.fs_path(*parts)}"


def filesystem(scheme: str) -> Any:
    """The fsspec filesystem of `scheme`, configured from the environment only.

    Raises:
        UnsupportedConfigurationError: when its package is not installed.
    """
    package, _ = SCHEMES[scheme]
    try:
        import fsspec

        __import__(package)
    except ImportError as e:
        extra = "gcs" if scheme == "gs" else "s3"
        raise errors.UnsupportedConfigurationError(
            f"backup_dir {scheme}://... needs the {package} package, which is not "
            f"installed ({e}). Install it with `pip install 'ft[{extra}]'` (or "
            f"`pip install {package}`)."
        ) from e
    endpoint = os.environ.get("STORAGE_EMULATOR_HOST") or os.environ.get("TENSORSTORE_GCS_HTTP_URL")
    if scheme == "gs" and endpoint:
        # Another GCS endpoint (an emulator): gcsfs's plain filesystem, without
        # its zonal-bucket lookup, a gRPC call to Google that only GCS answers.
        # TensorStore's variable points gcsfs there too unless gcsfs's own is set.
        from gcsfs.core import GCSFileSystem

        token: Any = "anon"
        testing_token = os.environ.get("GOOGLE_AUTH_TOKEN_FOR_TESTING")
        if testing_token:
            from google.oauth2.credentials import Credentials

            token = Credentials(testing_token)
        return GCSFileSystem(endpoint_url=endpoint, token=token, use_listings_cache=False)
    # No listing cache: other processes (and TensorStore, beside fsspec) write
    # to the same prefixes, and every listing ft makes must be fresh.
    return fsspec.filesystem(scheme, use_listings_cache=False)


def kvstore_spec(location: BucketURL, *parts: str) -> dict[str, Any]:
    """TensorStore's kvstore spec of `parts` below `location`, a directory (ends in '/')."""
    path = location.key(*parts) + "/"
    if location.scheme == "gs":
        return {"driver": "gcs", "bucket": location.bucket, "path": path}
    spec: dict[str, Any] = {"driver": "s3", "bucket": location.bucket, "path": path}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        spec["endpoint"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        spec["aws_region"] = region
    return spec
