"""Guest bytecode cache: our guest modules and cloudpickle compiled once by the guest.

The guest cannot write anywhere, so without this it compiles the driver and
cloudpickle from source on every boot and first restore (~100 ms in wasm).
Once per cache key, a one-off guest instance compiles them into a temporary
directory (its only writable preopen), which is then renamed into place; later
instances see it read-only as `/rlm/pyc`, ahead of the sources on sys.path.
The .pyc files run only inside the sandbox, so a tampered cache cannot reach
the host.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import structlog
import wasmtime

from ._runtime import PINNED_WASM_SHA256

log = structlog.get_logger(__name__)

_COMPILE = """
import os, importlib.util
from importlib._bootstrap_external import _code_to_hash_pyc
# Written by hand: py_compile's makedirs walks up to '/', which the guest cannot see.
def tree(src, dst, with_init):
    for name in sorted(os.listdir(src)):
        if not name.endswith('.py') or (name == '__init__.py' and not with_init):
            continue
        with open(src + '/' + name, 'rb') as handle:
            data = handle.read()
        code = compile(data, src + '/' + name, 'exec', dont_inherit=True)
        pyc = _code_to_hash_pyc(code, importlib.util.source_hash(data), checked=False)
        with open(dst + '/' + name[:-3] + '.pyc', 'wb') as handle:
            handle.write(pyc)
tree('/rlm/guest', '/rlm/out', False)
os.mkdir('/rlm/out/cloudpickle')
tree('/rlm/cloudpickle', '/rlm/out/cloudpickle', True)
"""


def bytecode_key(guest_dir: Path, cloudpickle_dir: Path) -> str:
    digest = hashlib.sha256(PINNED_WASM_SHA256.encode())
    for directory in (guest_dir, cloudpickle_dir):
        for path in sorted(directory.glob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:24]


def ensure_bytecode(engine: wasmtime.Engine, module: wasmtime.Module, cache_dir: Path,
                    guest_dir: Path, cloudpickle_dir: Path) -> Path | None:
    """Directory of compiled guest modules (built if missing), or None on failure."""
    target = cache_dir / f"guest-pyc-{bytecode_key(guest_dir, cloudpickle_dir)}"
    if (target / "rlm_driver.pyc").is_file():
        return target
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=cache_dir))
    except OSError as exc:
        log.warning("sandbox_bytecode_cache_unavailable", error=str(exc))
        return None
    try:
        store = wasmtime.Store(engine)
        store.set_epoch_deadline(2**62)
        wasi = wasmtime.WasiConfig()
        wasi.argv = ["python", "-I", "-S", "-B", "-c", _COMPILE]
        wasi.preopen_dir(str(guest_dir), "/rlm/guest", False)
        wasi.preopen_dir(str(cloudpickle_dir), "/rlm/cloudpickle", False)
        wasi.preopen_dir(str(work), "/rlm/out", True)
        wasi.inherit_stderr()
        store.set_wasi(wasi)
        linker = wasmtime.Linker(engine)
        linker.define_wasi()
        instance = linker.instantiate(store, module)
        try:
            instance.exports(store)["_start"](store)
        except wasmtime.ExitTrap as exc:
            if exc.code != 0:
                raise RuntimeError(f"guest compiler exited with code {exc.code}") from None
        try:
            work.rename(target)  # atomic; another process may have won the race
        except OSError:
            if not (target / "rlm_driver.pyc").is_file():
                raise
        return target
    except Exception as exc:
        log.warning("sandbox_bytecode_build_failed", error=str(exc))
        return None
    finally:
        shutil.rmtree(work, ignore_errors=True)
