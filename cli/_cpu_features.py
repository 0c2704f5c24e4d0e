"""Can this machine run the installed llama.cpp? Checked before the server starts.

llama.cpp's CPU code is compiled for a fixed set of instruction sets (AVX2,
AVX-512, AMX, ...). A build tuned to another CPU, or to a CPU whose virtual
machine does not enable some of what it advertises (AMX on a VM: the flag is
in /proc/cpuinfo, the registers are off), dies with SIGILL on its first
completion. So: read what the build uses (`llama_print_system_info()`
reports compile-time features; loading the library runs none of them),
read what the CPU has (/proc/cpuinfo) AND what the OS enabled (XCR0, read
with the `xgetbv` instruction), and refuse with the fix when they differ.

`python -m cli._cpu_features` prints the probe as JSON; it runs in a child
process so a library that crashes on load cannot take `rlm up` with it.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LLAMA_CPP_REQUIREMENT",
    "PORTABLE_CMAKE_ARGS",
    "Probe",
    "build_features",
    "check_installed_build",
    "cpu_flags",
    "missing_features",
    "read_xcr0",
    "reinstall_command",
]

LLAMA_CPP_REQUIREMENT = "llama-cpp-python[server]==0.3.36"
PORTABLE_CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF"
)
"""Any x86-64 CPU with AVX2 (2013 on): no AVX-512 or AMX code at all.
LLAVA_BUILD=OFF skips the multimodal library the server here never loads."""
COMPILE_MINUTES = 8
"""Measured for the portable build on 2 cores (see README)."""

# XCR0 state components the OS must enable before a program may touch them.
_XCR0_YMM = (1 << 1) | (1 << 2)  # SSE + AVX (upper halves of YMM)
_XCR0_ZMM = _XCR0_YMM | (1 << 5) | (1 << 6) | (1 << 7)  # opmask, ZMM_Hi256, Hi16_ZMM
_XCR0_AMX = (1 << 17) | (1 << 18)  # TILECFG, TILEDATA

REQUIREMENTS: dict[str, tuple[str, int]] = {
    "SSE3": ("pni", 0),
    "SSSE3": ("ssse3", 0),
    "AVX": ("avx", _XCR0_YMM),
    "AVX_VNNI": ("avx_vnni", _XCR0_YMM),
    "AVX2": ("avx2", _XCR0_YMM),
    "F16C": ("f16c", _XCR0_YMM),
    "FMA": ("fma", _XCR0_YMM),
    "BMI2": ("bmi2", 0),
    "AVX512": ("avx512f", _XCR0_ZMM),
    "AVX512_VBMI": ("avx512vbmi", _XCR0_ZMM),
    "AVX512_VNNI": ("avx512_vnni", _XCR0_ZMM),
    "AVX512_BF16": ("avx512_bf16", _XCR0_ZMM),
    "AMX_INT8": ("amx_int8", _XCR0_AMX),
}
"""Feature name in llama.cpp's system info -> (/proc/cpuinfo flag, XCR0 bits it needs)."""

# xor ecx, ecx; xgetbv; shl rdx, 32; or rax, rdx; ret  (XCR0 as one 64-bit value)
_XGETBV_X86_64 = bytes.fromhex("31c9" "0f01d0" "48c1e220" "4809d0" "c3")


@dataclass(frozen=True)
class Probe:
    """What the installed build uses and what this machine offers."""

    build: frozenset[str]
    """Instruction-set features llama.cpp was compiled to use."""
    flags: frozenset[str]
    """CPU flags from /proc/cpuinfo."""
    xcr0: int | None
    """XCR0 (state the OS enabled); None when it could not be read."""


def build_features(system_info: str) -> frozenset[str]:
    """Features set to 1 in `llama_print_system_info()`:
    "CPU : SSE3 = 1 | AVX2 = 1 | ... | REPACK = 1 | " -> {"SSE3", "AVX2", ...}."""
    found = set()
    for item in system_info.replace(":", "|").split("|"):
        name, sep, value = item.partition("=")
        if sep and value.strip() == "1":
            found.add(name.strip())
    return frozenset(found)


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of the first processor in /proc/cpuinfo."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def missing_features(probe: Probe) -> list[str]:
    """The build's features this machine cannot run, each with why; [] when
    all can run. Without XCR0 only the CPU flags are compared."""
    missing = []
    for name in sorted(probe.build & REQUIREMENTS.keys()):
        flag, xcr0_bits = REQUIREMENTS[name]
        if flag not in probe.flags:
            missing.append(f"{name} (the CPU has no {flag})")
        elif probe.xcr0 is not None and probe.xcr0 & xcr0_bits != xcr0_bits:
            absent = [bit for bit in range(64) if xcr0_bits >> bit & 1 and not probe.xcr0 >> bit & 1]
            missing.append(
                f"{name} (the CPU lists {flag} but the OS did not enable it: XCR0 bits "
                f"{', '.join(map(str, absent))} are off)"
            )
    return missing


def cmake_args_for(flags: frozenset[str], xcr0: int | None) -> str:
    """The portable build's CMake flags, minus what this machine cannot run
    (a CPU without AVX2 gets a build without AVX2)."""
    usable = Probe(build=frozenset(REQUIREMENTS), flags=flags, xcr0=xcr0)
    bad = {item.split()[0] for item in missing_features(usable)}
    if not bad & {"AVX", "AVX2", "FMA", "F16C"}:
        return PORTABLE_CMAKE_ARGS
    args = ["-DGGML_NATIVE=OFF"] + [f"-DGGML_{n}={'OFF' if n in bad else 'ON'}" for n in ("AVX", "AVX2", "FMA", "F16C")]
    return " ".join(args + ["-DLLAVA_BUILD=OFF"])


def reinstall_command(cmake_args: str = PORTABLE_CMAKE_ARGS) -> str:
    """The one command that rebuilds llama.cpp with `cmake_args`."""
    return (
        f'CMAKE_ARGS="{cmake_args}" pip install --force-reinstall --no-cache-dir --no-deps '
        f"'{LLAMA_CPP_REQUIREMENT}'"
    )


def read_xcr0() -> int | None:
    """XCR0 through `xgetbv`, run from an executable page; None when this is
    not x86-64, the OS has no XSAVE, or executable memory is refused."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        flags = cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return None
    if "xsave" not in flags:  # without OS XSAVE support xgetbv itself is illegal
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError, AttributeError):
        return None  # W+X memory refused (hardened kernel): fall back to /proc/cpuinfo
    try:
        page.write(_XGETBV_X86_64)
        buffer = ctypes.c_char.from_buffer(page)
        try:
            return int(ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(buffer))())
        finally:
            del buffer  # the mmap cannot close while a ctypes view exports it
    finally:
        page.close()


def _probe_here() -> dict[str, object]:
    """Runs in the child: import llama_cpp (its libraries load, nothing runs)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    return {
        "system_info": info.decode(errors="replace") if isinstance(info, bytes) else str(info),
        "cpuinfo_flags": sorted(cpu_flags(Path("/proc/cpuinfo").read_text())),
        "xcr0": read_xcr0(),
    }


def _signal_name(returncode: int) -> str:
    import signal

    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def check_installed_build(timeout: float = 60.0) -> str | None:
    """None when this machine can run the installed llama.cpp; else one line
    naming what it cannot run and the command that rebuilds it portable."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None  # the features checked here are x86 ones
    proc = subprocess.run(
        [sys.executable, "-m", "cli._cpu_features"], capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        why = _signal_name(proc.returncode) if proc.returncode < 0 else f"exit code {proc.returncode}"
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return (
            f"the installed llama.cpp cannot be loaded ({why}{': ' + tail if tail else ''}); "
            f"reinstall it for this machine (compiles about {COMPILE_MINUTES} minutes, pip shows no "
            f"progress meanwhile): {reinstall_command()}"
        )
    raw = json.loads(proc.stdout)
    flags = frozenset(raw["cpuinfo_flags"])
    probe = Probe(build=build_features(raw["system_info"]), flags=flags, xcr0=raw["xcr0"])
    missing = missing_features(probe)
    if not missing:
        return None
    return (
        f"the installed llama.cpp was built for another CPU: it uses {'; '.join(missing)}, so its server "
        f"would die with an illegal instruction; rebuild it portable (compiles about {COMPILE_MINUTES} "
        f"minutes, pip shows no progress meanwhile): {reinstall_command(cmake_args_for(flags, probe.xcr0))}"
    )


if __name__ == "__main__":
    sys.stdout.write(json.dumps(_probe_here()) + "\n")
