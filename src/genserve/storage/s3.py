"""An S3-compatible result store (AWS S3, MinIO, Ceph, R2, …) through boto3.

Workers write their outputs here themselves; the API reads them back or hands clients a presigned
URL. Credentials come only from the standard AWS chain (environment, ``~/.aws``, instance roles),
never from genserve's config. Object keys are ``prefix + <job_id>/<name>``: deterministic, so a
job run again overwrites its output and a restarted server finds an output by its job id.
"""
from __future__ import annotations

import io
from typing import Any

from .results import ObjectInfo, ResultRef, check_key

MULTIPART_THRESHOLD = 8 << 20  # larger outputs (videos) go up in parts, several at once
MULTIPART_CHUNK = 8 << 20  # S3's smallest part is 5 MiB


class S3ResultStore:
    """Implements ``ResultStore``. ``serve``: "redirect" (clients get a presigned URL) or "proxy"."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, region: str | None = None,
                 serve: str = "redirect", presign_expiry_s: int = 3600,
                 multipart_threshold: int = MULTIPART_THRESHOLD, part_bytes: int = MULTIPART_CHUNK) -> None:
        self.bucket, self.prefix = bucket, prefix
        self.endpoint_url, self.region = endpoint_url, region
        self.serve, self.presign_expiry_s = serve, presign_expiry_s
        self.multipart_threshold, self.part_bytes = multipart_threshold, part_bytes
        self._client: Any = None

    @property
    def client(self) -> Any:
        # Made on first use: the store is built in the server and in every worker, and a client
        # is neither picklable nor needed until something is written or read.
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                                        config=Config(retries={"max_attempts": 5, "mode": "standard"}))
        return self._client

    def _object(self, key: str) -> str:
        job_id, _, name = key.partition("/")
        check_key(job_id, name)
        return self.prefix + key

    def put(self, job_id: str, name: str, data: bytes, content_type: str) -> ResultRef:
        from boto3.s3.transfer import TransferConfig

        key = f"{job_id}/{name}"
        cfg = TransferConfig(multipart_threshold=self.multipart_threshold, multipart_chunksize=self.part_bytes,
                             max_concurrency=4)
        # One PUT below the threshold; a multipart upload above it (an object appears whole or not at all).
        self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._object(key),
                                   ExtraArgs={"ContentType": content_type}, Config=cfg)
        return ResultRef(key, content_type, len(data))

    def head(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        try:
            r = self.client.head_object(Bucket=self.bucket, Key=self._object(key))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        except ValueError:
            return None
        return ObjectInfo(int(r["ContentLength"]), r["LastModified"].timestamp())

    def exists(self, key: str) -> bool:
        try:
            return self.head(key) is not None
        except ValueError:
            return False

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._object(key))["Body"].read()

    def presigned_url(self, key: str, filename: str) -> str | None:
        if self.serve != "redirect":
            return None
        return self.client.generate_presigned_url(
            "get_object", ExpiresIn=self.presign_expiry_s,
            Params={"Bucket": self.bucket, "Key": self._object(key),
                    "ResponseContentDisposition": f'inline; filename="{filename}"'})

    def delete(self, key: str) -> int:
        info = self.head(key)
        if info is None:
            return 0
        self.client.delete_object(Bucket=self.bucket, Key=self._object(key))
        return info.bytes
