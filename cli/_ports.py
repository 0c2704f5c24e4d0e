"""Loopback port checks: is a port free, and find free ones for tests."""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["find_free_port", "find_free_port_block", "port_is_free"]

# Private servers (tests, benchmarks) get ports below the kernel's ephemeral
# range: a port picked inside it can be taken as the local end of any
# outgoing connection between the pick and the server's bind. CI lost a
# whole test session so (SeaweedFS' gRPC port, while Temporal was starting).
# The floor keeps clear of the embedded services' defaults (7233-17338).
_PRIVATE_FLOOR = 20_000
_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_DEFAULT_EPHEMERAL_LOW = 32_768  # Linux's default; macOS and IANA start at 49152


def port_is_free(host: str, port: int) -> bool:
    """True when a server could bind `host:port` now. SO_REUSEADDR mirrors
    what the servers do, so sockets in TIME_WAIT do not count as taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _private_range() -> range:
    """Ports no outgoing connection is given: from the floor up to the
    ephemeral range (or above it, where it starts too low)."""
    try:
        low, high = (int(v) for v in _EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        low, high = _DEFAULT_EPHEMERAL_LOW, 65_535
    if low - _PRIVATE_FLOOR >= 4_096:
        return range(_PRIVATE_FLOOR, low)
    if 65_535 - high >= 4_096:
        return range(high + 1, 65_536)
    return range(_PRIVATE_FLOOR, 65_536)  # a machine with no room outside it


def find_free_port_block(count: int, host: str = "127.0.0.1", *, avoid: set[int] | None = None) -> int:
    """First port of `count` consecutive ports free now, outside the
    ephemeral range and `avoid`. Random, so parallel sessions rarely meet."""
    avoid = avoid or set()
    ports = _private_range()
    rng = random.SystemRandom()
    for _ in range(500):
        base = rng.randrange(ports.start, ports.stop - count + 1)
        block = range(base, base + count)
        if not avoid.intersection(block) and all(port_is_free(host, p) for p in block):
            return base
    raise RuntimeError(f"no block of {count} consecutive free ports on {host} in {ports.start}-{ports.stop - 1}")


def find_free_port(host: str = "127.0.0.1", *, avoid: set[int] | None = None) -> int:
    """A port free right now that no outgoing connection can take before
    the caller's server binds it."""
    return find_free_port_block(1, host, avoid=avoid)
