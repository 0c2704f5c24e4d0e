"""The `ingest_context` activity: a run's first step when its caller gave
the context as JSON (inline text, a list of texts, or S3 files) instead of a
ContextRef. It stores the context through the same ContextStore as
`rlm context put` (sha256-addressed chunks, dedup, UTF-8 checks), so the run
goes on with a ContextRef exactly as if the caller had stored it.

S3 objects are read with the worker's endpoint and credentials (any bucket
they may read, but not the engine's own objects in its bucket: other runs'
snapshots, prompts and transcripts), downloaded to a private directory and stored as files, so a
large object never sits in memory. PDF, DOCX, XLSX, PPTX, HTML and EML
objects are converted to text (activities/documents); any other object must
be UTF-8 text. An object that cannot be read is refused with the reason,
named by its URI, or left out and listed with `on_unreadable: "skip"`.
Documents are named by their key under the prefix.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath

import structlog
import urllib3
from minio.error import S3Error
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities._context_input import NamedFile
from activities.context_store import ContextInputError
from activities.object_store import (
    ObjectMissingError,
    ObjectStore,
    S3AuthError,
    S3BucketMissingError,
    S3UnreachableError,
    StorageError,
)
from activities.runtime import WorkerRuntime
from workflows.names import ACTIVITY_INGEST_CONTEXT
from workflows.refs import ContextRef, ContextURI
from workflows.steps import IngestContextInput

__all__ = ["IngestContextActivity", "MAX_PREFIX_OBJECTS"]

log = structlog.get_logger(__name__)

MAX_PREFIX_OBJECTS = 100_000
"""Objects one prefix may hold: more is almost surely the wrong prefix."""
_DOWNLOAD_BYTES = 8 << 20
_HEARTBEAT_EVERY_S = 1.0
# The caller's mistake: retrying cannot help. Anything else (endpoint down,
# a corrupt read) is retried by the workflow's retry policy.
_CALLER_ERRORS = (ContextInputError, ObjectMissingError, S3BucketMissingError, S3AuthError)
# Where the engine keeps its own objects in its bucket: one run's caller must
# not read another's snapshots, prompts, replies or transcripts as a context.
ENGINE_PREFIXES = ("runs/", "blobs/", "contexts/")


class _Heartbeat:
    """Heartbeats the current activity at most once a second."""

    def __init__(self) -> None:
        self._last = 0.0

    def __call__(self, *details: object) -> None:
        now = time.monotonic()
        if now - self._last >= _HEARTBEAT_EVERY_S:
            self._last = now
            activity.heartbeat(*details)


class IngestContextActivity:
    def __init__(self, runtime: WorkerRuntime) -> None:
        self._rt = runtime

    @activity.defn(name=ACTIVITY_INGEST_CONTEXT)
    def ingest_context(self, inp: IngestContextInput) -> ContextRef:
        """Synchronous: runs on the worker's thread pool (hashing and
        uploading chunks is blocking work), heartbeating as it goes."""
        field = "context.uri" if inp.uri is not None else "context"
        try:
            if inp.text is not None:
                ref = self._rt.contexts.put_text(inp.text)
            elif inp.texts is not None:
                ref = self._rt.contexts.put_documents(inp.texts)
            elif inp.uri is not None:
                ref = self._put_uri(inp.uri, inp.on_unreadable)
            else:
                raise ContextInputError("no context given: send text, a list of texts or {\"uri\": ...}")
        except (ContextInputError, StorageError) as exc:
            retry = not isinstance(exc, _CALLER_ERRORS)
            log.warning("context not ingested", workflow_id=inp.workflow_id, error=str(exc)[:300], retry=retry)
            raise ApplicationError(f"{field}: {exc}", type="InvalidContext", non_retryable=not retry) from None
        log.info("context ingested", workflow_id=inp.workflow_id, sha256=ref.sha256[:16], docs=ref.doc_count)
        return ref

    def _put_uri(self, uri: ContextURI, on_unreadable: str) -> ContextRef:
        own = uri.bucket == self._rt.store.bucket
        if own and _engine_key(uri.key):
            raise ContextInputError(
                f"{uri.uri} is the engine's own storage (other runs' snapshots, prompts and "
                f"transcripts under {', '.join(ENGINE_PREFIXES)} in bucket {uri.bucket!r}): "
                "give your files a key outside those prefixes"
            )
        source = ObjectStore(self._rt.store.client, uri.bucket, endpoint=self._rt.store.endpoint)
        beat = _Heartbeat()
        keys = _visible(self._list(source, uri, beat), uri, skip_engine=own) if uri.is_prefix else [uri.key]
        scratch = Path(self._rt.settings.data_dir) / "cache" / "ingest"
        scratch.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="ctx-", dir=scratch))
        try:
            files = []
            for key in keys:
                path = root / _safe_relative(uri, key)
                self._download(source, uri, key, path, beat)
                # Named by the key under the prefix (the whole key for one object).
                name = key[len(uri.key) :] if uri.is_prefix else key
                files.append(NamedFile(path, name, f"s3://{uri.bucket}/{key}"))
            try:
                return self._rt.contexts.put_files(
                    files,
                    kind="list" if uri.is_prefix else "str",
                    progress=beat,
                    on_unreadable=on_unreadable,  # type: ignore[arg-type]
                    label=uri.uri,
                    tick=lambda: beat("converting"),
                )
            except ContextInputError as exc:
                # Name the objects, not our scratch files.
                text = str(exc).replace(f"{root}/", f"s3://{uri.bucket}/").replace(str(root), f"s3://{uri.bucket}/")
                raise ContextInputError(text) from None
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def _list(self, source: ObjectStore, uri: ContextURI, beat: _Heartbeat) -> list[str]:
        keys: list[str] = []
        try:
            for obj in source.client.list_objects(uri.bucket, prefix=uri.key, recursive=True):
                if obj.is_dir or obj.object_name.endswith("/"):
                    continue  # folder markers some tools create
                keys.append(obj.object_name)
                if len(keys) > MAX_PREFIX_OBJECTS:
                    raise ContextInputError(
                        f"{uri.uri} holds more than {MAX_PREFIX_OBJECTS:,} objects: give a narrower prefix"
                    )
                beat(len(keys))
        except S3Error as exc:
            raise _s3_error(exc, source, uri, uri.uri) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise S3UnreachableError(f"listing {uri.uri} on {source.endpoint} failed: {exc}") from None
        if not keys:
            raise ContextInputError(f"no objects under {uri.uri}: check the bucket and prefix")
        return keys

    def _download(self, source: ObjectStore, uri: ContextURI, key: str, dest: Path, beat: _Heartbeat) -> None:
        """Copy one object to `dest` in ranges (never whole in memory)."""
        size = self._size(source, uri, key)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            out = dest.open("wb")
        except OSError as exc:
            # S3 allows keys `p/a` and `p/a/b` side by side; a file system does
            # not (nor a key part over 255 bytes).
            raise ContextInputError(
                f"object key {key!r} under {uri.uri} cannot be read as a file ({exc.strerror or type(exc).__name__}): "
                "S3 allows a key that is also the folder of other keys, and key parts over 255 bytes; a file "
                "system does not: rename the object"
            ) from None
        with out:
            offset = 0
            while offset < size:
                block = source.get_range(key, offset, min(_DOWNLOAD_BYTES, size - offset))
                if not block:
                    raise StorageError(f"s3://{uri.bucket}/{key} ended at byte {offset} of {size}: it changed while read")
                out.write(block)
                offset += len(block)
                beat(key, offset)

    @staticmethod
    def _size(source: ObjectStore, uri: ContextURI, key: str) -> int:
        try:
            return int(source.client.stat_object(uri.bucket, key).size or 0)
        except S3Error as exc:
            raise _s3_error(exc, source, uri, f"s3://{uri.bucket}/{key}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise S3UnreachableError(f"reading s3://{uri.bucket}/{key} on {source.endpoint} failed: {exc}") from None


def _s3_error(exc: S3Error, source: ObjectStore, uri: ContextURI, what: str) -> StorageError:
    """A StorageError that names the URI (the caller's words), not our key."""
    if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
        return ObjectMissingError(f"{what} not found on {source.endpoint}: check the bucket and key")
    if exc.code == "NoSuchBucket":
        return S3BucketMissingError(f"bucket {uri.bucket!r} does not exist on {source.endpoint} ({what})")
    if exc.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return S3AuthError(f"{source.endpoint} refused to read {what} ({exc.code}) with the worker's credentials")
    return StorageError(f"reading {what} failed on {source.endpoint}: {exc.code}: {exc.message}")


def _engine_key(key: str) -> bool:
    """A key (or prefix) inside the engine's own objects; "" is the whole bucket, not inside."""
    return any(key.startswith(prefix) or (key and prefix.startswith(key) and key.endswith("/")) for prefix in ENGINE_PREFIXES)


def _visible(keys: list[str], uri: ContextURI, *, skip_engine: bool = False) -> list[str]:
    """Keys under the prefix without a hidden part (`.git/...`), in the
    order a local folder's files get (sorted by path parts); in the engine's
    own bucket (`skip_engine`), without its own objects."""
    shown = [k for k in keys if not any(p.startswith(".") for p in k[len(uri.key) :].split("/"))]
    if skip_engine:
        shown = [k for k in shown if not _engine_key(k)]
    if not shown:
        raise ContextInputError(
            f"no objects under {uri.uri} but hidden ones (a part starting with '.') or the engine's own"
        )
    return sorted(shown, key=lambda k: PurePosixPath(k).parts)


def _safe_relative(uri: ContextURI, key: str) -> PurePosixPath:
    """The key as a relative path that stays inside the scratch directory."""
    path = PurePosixPath(key)
    if key.startswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
        raise ContextInputError(
            f"object key {key!r} under {uri.uri} has an empty, '.' or '..' part: it cannot be read as a file"
        )
    return path
