"""Object storage behind the S3 API (MinIO, SeaweedFS, AWS) via `minio`.

Every failure surfaces as a `StorageError` subclass whose message names the
cause and the fix, because the usual causes (server not started, wrong keys,
no bucket) are configuration mistakes a user must be able to act on.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from contextlib import contextmanager

import structlog
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from activities.settings import Settings
from workflows.refs import BlobRef

__all__ = [
    "IntegrityError",
    "ObjectMissingError",
    "ObjectStore",
    "S3AuthError",
    "S3BucketMissingError",
    "S3UnreachableError",
    "StorageError",
    "UPLOAD_GRACE_S",
    "WORKER_BLOB_CACHE_BYTES",
    "blob_ref",
    "wait_for_object",
]

log = structlog.get_logger(__name__)

_AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
}
# Fail fast on a dead endpoint: a few seconds, not urllib3's minutes.
_CONNECT_TIMEOUT_S = 3.0
_READ_TIMEOUT_S = 120.0
# A worker's threads for blocking storage calls (runtime.io_pool), so the
# connections a store keeps: fewer, and a batch's uploads dropped the rest.
STORAGE_THREADS = 64
# A worker's recent blobs (its cells' prompts, read back by the sub-call
# activities it runs): the 200 x 200 KB prompts of bench_vs_rlms fit.
WORKER_BLOB_CACHE_BYTES = 64 * 1024 * 1024
# Below this size a blob's upload costs about what an existence check does.
_CHECK_BEFORE_PUT_BYTES = 1024 * 1024
# How long a reader waits for an object that another process may still be
# uploading before calling it missing: a context `rlm run` uploads after its
# run has started (activities/_context_upload.py), a cell's sub-call prompts
# stored behind their update (`put_blob_behind`). A worker on the same machine
# reads its own copy; one elsewhere reads the bucket, which may lag that much.
UPLOAD_GRACE_S = 15.0


class StorageError(Exception):
    """Object storage failed; the message says why and what to do."""


class S3UnreachableError(StorageError):
    """Nothing answers at the S3 endpoint."""


class S3AuthError(StorageError):
    """The S3 endpoint rejected the credentials, or none are configured."""


class S3BucketMissingError(StorageError):
    """The configured bucket does not exist."""


class ObjectMissingError(StorageError):
    """A key that should exist does not."""


class IntegrityError(StorageError):
    """Stored bytes do not match their recorded sha256."""


def _http_client() -> urllib3.PoolManager:
    retry = urllib3.Retry(
        total=3,
        connect=2,
        backoff_factor=0.2,
        status_forcelist=(500, 502, 503, 504),
        allowed_methods=None,  # S3 PUTs of content-addressed keys are idempotent
    )
    timeout = urllib3.Timeout(connect=_CONNECT_TIMEOUT_S, read=_READ_TIMEOUT_S)
    return urllib3.PoolManager(timeout=timeout, retries=retry, maxsize=STORAGE_THREADS)


class ObjectStore:
    """A bucket on an S3 endpoint, with sha256-addressed blobs on top."""

    def __init__(
        self,
        client: Minio,
        bucket: str,
        *,
        endpoint: str,
        credentials_hint: str = "RLM_S3_ACCESS_KEY / RLM_S3_SECRET_KEY",
        blob_cache_bytes: int = 0,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.endpoint = endpoint
        self._credentials_hint = credentials_hint
        self._recent = _RecentBlobs(blob_cache_bytes)
        self._storing: dict[str, tuple[str, bytes]] = {}
        """Blobs being stored behind (key -> (sha256, bytes)), readable here meanwhile."""
        self._storing_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, *, blob_cache_bytes: int = 0) -> ObjectStore:
        """`blob_cache_bytes`: keep up to that many bytes of the blobs this
        process stored or read, so reading one back costs no request (a worker
        passes WORKER_BLOB_CACHE_BYTES; clients keep none)."""
        credentials = settings.s3_credentials()
        if credentials is None:
            raise S3AuthError(
                f"no S3 credentials for {settings.s3_endpoint}: run `rlm up` (it writes "
                f"them to {settings.credentials_file}) or set RLM_S3_ACCESS_KEY and "
                "RLM_S3_SECRET_KEY"
            )
        client = Minio(
            settings.s3_endpoint,
            access_key=credentials[0],
            secret_key=credentials[1],
            secure=settings.s3_secure,
            region=settings.s3_region,
            http_client=_http_client(),
        )
        hint = "RLM_S3_ACCESS_KEY / RLM_S3_SECRET_KEY"
        if not settings.s3_access_key:
            hint += f" (the embedded server's keys are in {settings.credentials_file})"
        return cls(
            client, settings.s3_bucket, endpoint=settings.s3_endpoint, credentials_hint=hint,
            blob_cache_bytes=blob_cache_bytes,
        )

    @contextmanager
    def _errors(self, action: str, key: str | None = None) -> Iterator[None]:
        """Translate client failures into StorageErrors that say what to do."""
        where = f"{action} {key!r}" if key else action
        try:
            yield
        except S3Error as exc:
            if exc.code in ("NoSuchBucket",):
                raise S3BucketMissingError(
                    f"bucket {self.bucket!r} does not exist on {self.endpoint} ({where}): "
                    "run `rlm up`, create the bucket, or set RLM_S3_BUCKET"
                ) from None
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise ObjectMissingError(
                    f"object {key!r} not found in bucket {self.bucket!r} on {self.endpoint}"
                ) from None
            if exc.code in _AUTH_CODES:
                raise S3AuthError(
                    f"S3 endpoint {self.endpoint} rejected the credentials ({exc.code}) "
                    f"for bucket {self.bucket!r}: check {self._credentials_hint}"
                ) from None
            raise StorageError(f"S3 {where} failed on {self.endpoint}: {exc.code}: {exc.message}") from exc
        except (InvalidResponseError, ServerError) as exc:
            raise StorageError(
                f"{self.endpoint} did not answer as an S3 server during {where} "
                f"({str(exc)[:200]}): check RLM_S3_ENDPOINT and RLM_S3_SECURE"
            ) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            if isinstance(reason, urllib3.exceptions.ResponseError):
                raise StorageError(
                    f"S3 endpoint {self.endpoint} keeps answering {where} with server errors "
                    f"({reason}): check the server (`rlm status` and its log)"
                ) from None
            raise S3UnreachableError(
                f"S3 endpoint {self.endpoint} is unreachable ({type(reason).__name__}): "
                "start it with `rlm up` or set RLM_S3_ENDPOINT"
            ) from None

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet."""
        with self._errors("creating bucket"):
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)
                log.info("bucket created", bucket=self.bucket, endpoint=self.endpoint)

    def check(self) -> None:
        """Raise a StorageError unless the endpoint answers, accepts the
        credentials and has the bucket."""
        with self._errors("checking bucket"):
            exists = self.client.bucket_exists(self.bucket)
        if not exists:
            raise S3BucketMissingError(
                f"bucket {self.bucket!r} does not exist on {self.endpoint}: "
                "run `rlm up`, create the bucket, or set RLM_S3_BUCKET"
            )

    def probe_write(self) -> None:
        """Write, read back and delete a tiny object: the endpoint serves
        data, not only bucket metadata (a fresh server may not yet)."""
        key = "_health/probe"
        self.put_bytes(key, b"ok")
        if self.get_bytes(key) != b"ok":
            raise StorageError(f"S3 endpoint {self.endpoint} returned wrong bytes for {key!r}")
        with self._errors("delete of", key):
            self.client.remove_object(self.bucket, key)

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._errors("upload of", key):
            self.client.put_object(self.bucket, key, io.BytesIO(data), len(data))

    def put_segments(self, key: str, segments: list[bytes]) -> None:
        """Upload the concatenation of `segments` without joining them first
        (a snapshot's records can be hundreds of MB)."""
        size = sum(len(s) for s in segments)
        with self._errors("upload of", key):
            self.client.put_object(self.bucket, key, _SegmentReader(segments), size)

    def get_bytes(self, key: str) -> bytes:
        with self._errors("download of", key):
            response = self.client.get_object(self.bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """`length` bytes of `key` starting at `offset` (fewer at the end)."""
        if length <= 0:
            return b""
        with self._errors("ranged download of", key):
            response = self.client.get_object(self.bucket, key, offset=offset, length=length)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def exists(self, key: str) -> bool:
        try:
            with self._errors("existence check of", key):
                self.client.stat_object(self.bucket, key)
        except ObjectMissingError:
            return False
        return True

    def keys(self, prefix: str) -> list[str]:
        """Keys of the objects under `prefix`, in key order."""
        with self._errors("listing of", prefix):
            return sorted(o.object_name for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=True))

    def count(self, prefix: str = "") -> int:
        """Number of objects under `prefix` (for tests and diagnostics)."""
        return len(self.keys(prefix))

    def put_blob(self, data: bytes, prefix: str = "blobs") -> BlobRef:
        """Store `data` under its sha256 (once) and return a reference."""
        ref = blob_ref(data, prefix)
        self._store_blob(ref, data)
        return ref

    def put_blob_behind(self, data: bytes, executor: Executor) -> tuple[BlobRef, Future[BlobRef]]:
        """`data`'s reference at once, and the future of its upload on
        `executor`. Meanwhile this process reads the blob from memory
        (`cached_blob`, `get_blob`) and another one waits for it (`get_blob`'s
        grace): a cell's sub-calls start before their prompts reach the bucket."""
        ref = blob_ref(data)
        with self._storing_lock:
            self._storing.setdefault(ref.key, (ref.sha256, data))
        return ref, executor.submit(self._store_behind, ref, data)

    def _store_behind(self, ref: BlobRef, data: bytes) -> BlobRef:
        try:
            self._store_blob(ref, data)
        finally:
            with self._storing_lock:
                self._storing.pop(ref.key, None)
        return ref

    def _store_blob(self, ref: BlobRef, data: bytes) -> None:
        if self._recent.get(ref.key, ref.sha256) is None:
            if len(data) < _CHECK_BEFORE_PUT_BYTES or not self.exists(ref.key):
                self.put_bytes(ref.key, data)
            self._recent.add(ref.key, ref.sha256, data)

    def cached_blob(self, ref: BlobRef) -> bytes | None:
        """The blob's bytes if this process holds them (stored, being stored or read)."""
        data = self._recent.get(ref.key, ref.sha256)
        if data is None:
            with self._storing_lock:
                sha256, data = self._storing.get(ref.key, (None, None))
            data = data if sha256 == ref.sha256 else None  # as `_recent`: a ref naming another hash is not answered
        return data if data is not None and len(data) == ref.size else None

    def get_blob(self, ref: BlobRef, *, grace_s: float = 0.0) -> bytes:
        """The blob's bytes, checked against its sha256; `grace_s`: how long a
        missing blob is waited for (UPLOAD_GRACE_S: one stored behind)."""
        cached = self.cached_blob(ref)
        if cached is not None:
            return cached  # hashed when it was stored or first read
        data = wait_for_object(lambda: self.get_bytes(ref.key), grace_s)
        digest = hashlib.sha256(data).hexdigest()
        if digest != ref.sha256 or len(data) != ref.size:
            raise IntegrityError(
                f"blob {ref.key!r} is corrupt: expected sha256 {ref.sha256} ({ref.size} bytes), "
                f"got {digest} ({len(data)} bytes)"
            )
        self._recent.add(ref.key, digest, data)
        return data


def blob_ref(data: bytes, prefix: str = "blobs") -> BlobRef:
    """Where `data` is stored as a blob: under its sha256."""
    digest = hashlib.sha256(data).hexdigest()
    return BlobRef(key=f"{prefix}/{digest}", size=len(data), sha256=digest)


def wait_for_object(read: Callable[[], bytes], grace_s: float) -> bytes:
    """`read()`, tried again while it finds no object and `grace_s` lasts
    (0.1 s apart, then twice as long each time, up to 2 s: ~10 reads in 15 s)."""
    deadline = time.monotonic() + grace_s
    pause = 0.1
    while True:
        try:
            return read()
        except ObjectMissingError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            time.sleep(min(pause, left))
            pause = min(pause * 2, 2.0)


class _RecentBlobs:
    """The most recently stored or read blobs, up to a byte budget (0: none).
    Blobs are immutable (named by their sha256) and never deleted by the
    engine, so a copy here is never stale."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._size = 0
        self._blobs: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, sha256: str) -> bytes | None:
        """The bytes kept under `key`, if their hash is `sha256`."""
        if not self._max:
            return None
        with self._lock:
            entry = self._blobs.get(key)
            if entry is None or entry[0] != sha256:
                return None
            self._blobs.move_to_end(key)
            return entry[1]

    def add(self, key: str, sha256: str, data: bytes) -> None:
        if not self._max or len(data) > self._max // 8:
            return  # one large blob must not flush the rest
        with self._lock:
            if key in self._blobs:
                return
            self._blobs[key] = (sha256, data)
            self._size += len(data)
            while self._size > self._max:
                _, (_, dropped) = self._blobs.popitem(last=False)
                self._size -= len(dropped)


class _SegmentReader(io.RawIOBase):
    """A read-only stream over a list of buffers, copied only as they are read."""

    def __init__(self, segments: list[bytes]) -> None:
        self._segments = [memoryview(s).cast("B") for s in segments if len(s)]
        self._index = 0
        self._offset = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        parts = []
        while self._index < len(self._segments) and size != 0:
            view = self._segments[self._index][self._offset:]
            if 0 < size < len(view):
                view = view[:size]
            parts.append(view)
            self._offset += len(view)
            if size > 0:
                size -= len(view)
            if self._offset == len(self._segments[self._index]):
                self._index += 1
                self._offset = 0
        return b"".join(parts)
