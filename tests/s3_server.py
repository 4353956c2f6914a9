"""A local S3 endpoint for the tests (moto's server): object storage cannot exist here.

It speaks the S3 REST API over HTTP on loopback, so pyarrow, Ray Tune and the project's
result files reach it through the same code paths as a real bucket; the URI carries the
endpoint (``?endpoint_override=…&scheme=http&region=…``) and the credentials come from
the ``AWS_*`` variables of :data:`CREDENTIALS`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


def have_moto() -> bool:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class S3:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str

    def uri(self, path: str) -> str:
        """``s3://bucket/path`` with the options that point pyarrow at this endpoint."""
        host = self.endpoint.removeprefix("http://")
        return (f"s3://{self.bucket}/{path.strip('/')}?endpoint_override={host}"
                "&scheme=http&region=us-east-1")

    def keys(self, prefix: str = "") -> list[str]:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, **_boto_credentials())
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                 Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


def _boto_credentials() -> dict[str, str]:
    return {"aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "region_name": CREDENTIALS["AWS_DEFAULT_REGION"]}


@contextmanager
def running_s3(bucket: str = "sweeps") -> Iterator[S3]:
    """Start the server on a free loopback port with one empty bucket; stop it afterwards.

    Sets the ``AWS_*`` credentials in this process's environment while it runs (pyarrow
    reads them from there); processes started meanwhile inherit them.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint, **_boto_credentials()).create_bucket(
            Bucket=bucket)
        yield S3(endpoint, bucket)
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
