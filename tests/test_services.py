"""The embedded-service launcher against the real binaries, each test with
its own data dir and ports (independent of the session's servers)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import stat
import subprocess
import urllib.request
from pathlib import Path

import pytest

from activities.object_store import ObjectStore
from activities.settings import Settings
from cli import services
from cli._ports import port_holders, port_is_free
from cli._process import PidRecord, write_pid_file
from cli.main import main
from tests.fixtures_services import isolated_settings
from workflows.names import SEARCH_ATTRIBUTES


def _all_ports(settings: Settings) -> list[int]:
    return [port for ports in services.service_ports(settings).values() for port in ports]


def _outside_ip() -> str | None:
    """This machine's non-loopback address, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))  # no packet is sent for UDP connect
            ip = sock.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def _processes_using(data_dir: Path) -> list[int]:
    """Pids of processes whose command line mentions `data_dir`."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(data_dir).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.fixture
def private(tmp_path: Path):
    """Settings for a private pair; whatever a test starts is stopped after it."""
    settings = isolated_settings(tmp_path / "data")
    yield settings
    services.down(settings, timeout=5)
    assert _processes_using(settings.data_dir) == [], "a server outlived `rlm down`"


def test_up_status_down_restart_keeps_data(private: Settings) -> None:
    first = services.up(private)
    assert first.healthy, first
    assert first.temporal.pid and first.s3.pid
    assert first.ui_url == f"http://127.0.0.1:{private.temporal_ui_port}"
    with urllib.request.urlopen(first.ui_url, timeout=5) as response:
        assert response.status == 200

    creds = private.data_dir / "s3-credentials.json"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    store = ObjectStore.from_settings(private)
    store.check()  # the bucket exists
    store.put_bytes("survives/restart", b"kept")

    # The search attributes are registered on the namespace.
    url = f"http://127.0.0.1:{private.temporal_http_port}/api/v1/namespaces/default/search-attributes"
    with urllib.request.urlopen(url, timeout=5) as response:
        custom = json.load(response)["customAttributes"]
    assert set(SEARCH_ATTRIBUTES) <= set(custom)

    # Every port is bound to loopback only.
    outside = _outside_ip()
    if outside is not None:
        for port in (private.temporal_port, private.s3_port, private.temporal_ui_port):
            with pytest.raises(OSError), socket.create_connection((outside, port), timeout=1):
                pass

    again = services.up(private)
    assert (again.temporal.pid, again.s3.pid) == (first.temporal.pid, first.s3.pid)
    # Another bucket needs no restart: `up` reuses the servers and creates it.
    other_bucket = private.model_copy(update={"s3_bucket": "second-bucket"})
    assert services.up(other_bucket).s3.pid == first.s3.pid
    ObjectStore.from_settings(other_bucket).check()
    # Other ports while running: refused with the way out.
    moved = private.model_copy(update={"temporal_ui_port": private.temporal_ui_port + 1})
    with pytest.raises(services.LauncherError, match=f"--ui-port {moved.temporal_ui_port}.*rlm down"):
        services.up(moved)

    assert sorted(services.down(private)) == ["s3", "temporal"]
    after = services.status(private)
    assert not after.temporal.running and not after.s3.running and not after.healthy
    assert all(port_is_free("127.0.0.1", p) for p in _all_ports(private))
    assert not list((private.data_dir / "run").glob("*.pid"))
    assert services.down(private) == []

    restarted = services.up(private)
    assert restarted.healthy
    assert ObjectStore.from_settings(private).get_bytes("survives/restart") == b"kept"


def test_temporal_port_taken_names_port_and_setting(private: Settings) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", private.temporal_port))
        blocker.listen()
        with pytest.raises(services.LauncherError) as caught:
            services.up(private)
    message = str(caught.value)
    assert str(private.temporal_port) in message and "RLM_TEMPORAL_ADDRESS" in message
    assert f"pid {os.getpid()} (" in message and "listening" in message  # who to stop
    assert not services.status(private).s3.running


def test_port_holders_names_the_process_and_what_its_socket_is() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert port_holders(port) == [f"pid {os.getpid()} ({_comm()}): listening"]
        with socket.create_connection(("127.0.0.1", port)) as client:
            local = client.getsockname()[1]
            assert port_holders(local) == [f"pid {os.getpid()} ({_comm()}): an established connection to 127.0.0.1:{port}"]
    assert port_holders(port) == []  # nothing holds it now (the client closed first: TIME_WAIT is on its port)


def test_ports_held_without_a_listener_are_not_picked(monkeypatch) -> None:
    # A server killed for an outage keeps its ports held by bound sockets
    # (tests/chaos/servers.py): another suite picking ports must not take them.
    import cli._ports as ports

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        base = probe.getsockname()[1]
    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        held.bind(("127.0.0.1", base))
        assert port_is_free("127.0.0.1", base)  # a server setting SO_REUSEADDR could still bind it
        monkeypatch.setattr(ports, "_private_range", lambda: range(base, base + 1))
        with pytest.raises(RuntimeError, match="no block of 1"):
            ports.find_free_port()
    finally:
        held.close()
    assert ports.find_free_port() == base


def test_a_port_is_handed_out_once_per_process(monkeypatch) -> None:
    # Free until its server binds it: two threads choosing at once must not
    # both get it (CI: the chaos outages' server pairs, started together).
    import cli._ports as ports

    # Six ports free now, outside the ephemeral range (a block after bind(0)
    # can hold a port another test's connection took: CI95).
    monkeypatch.setattr(ports, "_handed_out", set())
    base = ports.find_free_port_block(6)
    monkeypatch.setattr(ports, "_private_range", lambda: range(base, base + 6))
    monkeypatch.setattr(ports, "_handed_out", set())
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        picked = list(pool.map(lambda _: ports.find_free_port(), range(6)))
    assert sorted(picked) == list(range(base, base + 6))  # all still free, none given twice
    with pytest.raises(RuntimeError, match="no block of 1"):
        ports.find_free_port()


def _comm() -> str:
    return Path("/proc/self/comm").read_text().strip()


def test_s3_port_taken_stops_what_was_started(private: Settings) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", private.s3_port))
        blocker.listen()
        with pytest.raises(services.LauncherError, match="RLM_S3_ENDPOINT"):
            services.up(private)
    status = services.status(private)
    assert not status.temporal.running and not status.s3.running
    assert _processes_using(private.data_dir) == []  # the Temporal it had started is gone


def test_stale_pid_files_are_replaced(private: Settings) -> None:
    run_dir = private.data_dir / "run"
    run_dir.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    # One pid is gone; the other is alive but is not our server (pid reuse).
    write_pid_file(run_dir / "temporal.pid", PidRecord(pid=dead.pid, argv=["temporal"], ports={}, log_file=""))
    write_pid_file(run_dir / "s3.pid", PidRecord(pid=os.getpid(), argv=["weed"], ports={}, log_file=""))

    before = services.status(private)
    assert "stale pid file" in before.temporal.detail and not before.s3.running

    status = services.up(private)
    assert status.healthy
    assert status.s3.pid != os.getpid() and status.temporal.pid != dead.pid


def test_private_ports_are_outside_the_ephemeral_range(tmp_path: Path) -> None:
    # An ephemeral port can become the local end of any outgoing connection
    # between the pick and the bind (CI lost a session to that once).
    low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _ in range(20):
        ports = _all_ports(isolated_settings(tmp_path))
        assert len(set(ports)) == len(ports)
        assert not [p for p in ports if low <= p <= high]
        assert all(port_is_free("127.0.0.1", p) for p in ports)


def test_up_refuses_remote_addresses(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path, temporal_address="10.1.2.3:7233")
    with pytest.raises(services.LauncherError, match="127.0.0.1 only"):
        services.up(settings)


def test_cli_status_reports_session_services(settings: Settings, monkeypatch, capsys) -> None:
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    assert main(["status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["healthy"] and report["data_dir"] == str(settings.data_dir)
    assert report["temporal"]["address"] == settings.temporal_address


def test_cli_error_is_one_line_without_traceback(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("RLM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("RLM_S3_ENDPOINT", "http://127.0.0.1:9000")
    assert main(["status"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: invalid settings: RLM_S3_ENDPOINT") and "Traceback" not in err
