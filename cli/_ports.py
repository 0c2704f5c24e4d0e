"""Loopback port checks: is a port free, who holds it, and find free ones
for tests."""

from __future__ import annotations

import os
import random
import socket
import threading
from pathlib import Path

__all__ = ["find_free_port", "find_free_port_block", "port_holders", "port_is_free"]

# Private servers (tests, benchmarks) get ports below the kernel's ephemeral
# range: a port picked inside it can be taken as the local end of any
# outgoing connection between the pick and the server's bind. CI lost a
# whole test session so (SeaweedFS' gRPC port, while Temporal was starting).
# The floor keeps clear of the embedded services' defaults (7233-17338).
_PRIVATE_FLOOR = 20_000
_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_DEFAULT_EPHEMERAL_LOW = 32_768  # Linux's default; macOS and IANA start at 49152
_TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
_TCP_STATES = {
    "01": "an established connection", "02": "a connection being opened", "03": "a connection being accepted",
    "04": "a closing connection (FIN_WAIT1)", "05": "a closing connection (FIN_WAIT2)",
    "06": "a closed connection in TIME_WAIT", "07": "a closed socket", "08": "a closing connection (CLOSE_WAIT)",
    "09": "a closing connection (LAST_ACK)", "0A": "listening", "0B": "a closing connection (CLOSING)",
}  # fmt: skip
_MAX_HOLDERS = 3
# Ports this process has handed out. A port is free until its server binds
# it, seconds later: two threads choosing at once (the chaos outages start
# their server pairs together) would otherwise both pick it, and one server
# pair would find it taken at its start or restart.
_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def port_is_free(host: str, port: int) -> bool:
    """True when a server could bind `host:port` now. SO_REUSEADDR mirrors
    what the servers do, so sockets in TIME_WAIT do not count as taken."""
    return _binds(host, port, reuse=True)


def _binds(host: str, port: int, *, reuse: bool) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_holders(port: int) -> list[str]:
    """What holds TCP `port` on this machine, for an error an operator can act
    on: "pid 812 (weed): listening", "pid 77 (python3): an established
    connection to 127.0.0.1:7233". Linux only (/proc); empty elsewhere or
    when nothing is found. Reads every process's descriptors: error paths only."""
    sockets: dict[str, str] = {}  # inode -> what the socket is
    for table in _TCP_TABLES:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or int(fields[1].rsplit(":", 1)[1], 16) != port:
                continue
            what = _TCP_STATES.get(fields[3], f"a socket in state {fields[3]}")
            if fields[3] != "0A":
                what += f" to {_address(fields[2])}"
            sockets.setdefault(fields[9], what)
    if not sockets:
        return []
    holders: list[str] = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        if not sockets.keys() - {"0"}:
            break  # every socket that has an owner has been named
        owned = _socket_inodes(fd_dir) & sockets.keys()
        for inode in owned:
            try:
                comm = (fd_dir.parent / "comm").read_text().strip()
            except OSError:
                comm = "?"
            holders.append(f"pid {fd_dir.parent.name} ({comm}): {sockets.pop(inode)}")
    # Inode 0: no process owns it any more (TIME_WAIT, orphaned closes).
    holders += [f"{'no process' if inode == '0' else 'a process not ours to inspect'}: {what}" for inode, what in sockets.items()]  # fmt: skip
    return holders[:_MAX_HOLDERS]


def _socket_inodes(fd_dir: Path) -> set[str]:
    """Inodes of the sockets a process has open (empty if not ours to read)."""
    inodes = set()
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            link = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor, for one)
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    return inodes


def _address(hex_address: str) -> str:
    """`0100007F:1C41` (/proc/net/tcp) -> `127.0.0.1:7233`; IPv6 left in hex."""
    host, port = hex_address.rsplit(":", 1)
    if len(host) == 8:
        host = socket.inet_ntoa(bytes.fromhex(host)[::-1])
    return f"{host}:{int(port, 16)}"


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
    ephemeral range and `avoid`, and never handed out before by this
    process. Random, so parallel sessions rarely meet."""
    avoid = avoid or set()
    ports = _private_range()
    rng = random.SystemRandom()
    with _handed_out_lock:
        for _ in range(500):
            base = rng.randrange(ports.start, ports.stop - count + 1)
            block = range(base, base + count)
            # Stricter than port_is_free: without SO_REUSEADDR any socket on the
            # port counts, one in TIME_WAIT and one bound to hold the port (a
            # server down for a while, tests/chaos/servers.py) among them.
            if avoid.intersection(block) or _handed_out.intersection(block):
                continue
            if all(_binds(host, p, reuse=False) for p in block):
                _handed_out.update(block)
                return base
    raise RuntimeError(f"no block of {count} consecutive free ports on {host} in {ports.start}-{ports.stop - 1}")


def find_free_port(host: str = "127.0.0.1", *, avoid: set[int] | None = None) -> int:
    """A port free right now that no outgoing connection can take before
    the caller's server binds it."""
    return find_free_port_block(1, host, avoid=avoid)
