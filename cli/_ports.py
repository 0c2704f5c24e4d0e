"""Loopback port checks: is a port free, and find free ones for tests."""

from __future__ import annotations

import socket

__all__ = ["find_free_port", "find_free_port_block", "port_is_free"]


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


def find_free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel considers free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def find_free_port_block(count: int, host: str = "127.0.0.1", *, avoid: set[int] | None = None) -> int:
    """First port of `count` consecutive free ports (none of them in `avoid`)."""
    avoid = avoid or set()
    for _ in range(200):
        base = find_free_port(host)
        if base + count >= 65536:
            continue
        block = range(base, base + count)
        if not avoid.intersection(block) and all(port_is_free(host, p) for p in block):
            return base
    raise RuntimeError(f"no block of {count} consecutive free ports on {host}")
