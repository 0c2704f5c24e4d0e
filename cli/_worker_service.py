"""The embedded worker: a detached `python -m worker` that `rlm up`, `rlm run`,
`rlm submit` and `rlm demo` keep alive next to the embedded Temporal and S3.

Why a service rather than a worker inside `rlm run`: an in-process worker
dies with its command, and Temporal keeps a gone worker in a task queue's
poller list for about a minute, so the next command could not tell whether
anyone would serve its run (it waited forever). Liveness therefore comes
from the pid file and /proc (`cli._process.is_alive`), never from Temporal.

The worker's identity is a digest of what it runs with: the project's code
(workflows/, activities/, sandbox_wasm/, worker.py), the settings, and the
model configuration and provider credentials of the environment that
started it. It is part of the command line, so `is_alive` also tells
"our worker, current" from "our worker, outdated"; an outdated one is
restarted (SIGTERM: a graceful shutdown; what it had in flight is retried
by the new one, and durable runs lose nothing). One worker per task queue
and namespace, so runs on another queue never replace it.

Orchestration under the data dir's lock lives in `cli.services`; this module
knows where the files are and what to start.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from activities.settings import Settings
from cli._process import PidRecord, is_alive, read_pid_file, spawn_detached, write_pid_file

__all__ = [
    "CODE_DIRS",
    "WorkerFiles",
    "all_pid_files",
    "argv",
    "code_digest",
    "identity",
    "is_ready",
    "live_record",
    "start",
]

CODE_DIRS = ("workflows", "activities", "sandbox_wasm")
_ROOT = Path(__file__).resolve().parent.parent
"""Where worker.py and the code directories live (the repo, or site-packages)."""
_PROVIDER_ENV = re.compile(
    r"^(LITELLM_|OPENAI_|ANTHROPIC_|GEMINI_|AZURE_|AWS_|GOOGLE_|VERTEX)|_(API_KEY|API_BASE|BASE_URL|API_VERSION)$"
)
"""Environment variables litellm may read for a provider (keys, endpoints)."""
_MODEL_CONFIG_ENV = ("RLM_MODELS_FILE", "RLM_MODELS_JSON")


class WorkerFiles:
    """Pid, readiness and log files of the worker serving one task queue."""

    def __init__(self, settings: Settings) -> None:
        slug = re.sub(r"[^A-Za-z0-9_.-]", "_", settings.task_queue)[:60]
        if slug != settings.task_queue or settings.temporal_namespace != "default":
            key = f"{settings.temporal_namespace}/{settings.task_queue}".encode()
            slug = f"{slug}-{hashlib.sha256(key).hexdigest()[:8]}"
        self.pid_file = settings.data_dir / "run" / f"worker-{slug}.pid"
        self.ready_file = self.pid_file.with_suffix(".ready")
        self.log_file = settings.data_dir / "logs" / f"worker-{slug}.log"


def all_pid_files(settings: Settings) -> list[Path]:
    """Every worker's pid file in the data dir (all task queues), for `rlm down`."""
    return sorted((settings.data_dir / "run").glob("worker-*.pid"))


def code_digest() -> str:
    """sha256 over the source the worker runs (file names and contents)."""
    digest = hashlib.sha256()
    files = [_ROOT / "worker.py", *sorted(p for d in CODE_DIRS for p in (_ROOT / d).rglob("*.py"))]
    for path in files:
        digest.update(f"{path.relative_to(_ROOT)}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _environment(settings: Settings, environ: dict[str, str]) -> dict[str, str]:
    """What the worker's behaviour depends on: settings and model configuration,
    including the variables named as API keys in that configuration."""
    env = {k: v for k, v in environ.items() if _PROVIDER_ENV.search(k) or k in _MODEL_CONFIG_ENV}
    env |= settings.to_env()
    for name in _MODEL_CONFIG_ENV:
        if name == "RLM_MODELS_FILE" and environ.get(name):
            try:
                env[f"{name}:content"] = Path(environ[name]).read_text(errors="replace")
            except OSError as exc:
                env[f"{name}:content"] = f"unreadable: {exc}"
    for key_env in re.findall(r'"api_key_env"\s*:\s*"([A-Za-z_][A-Za-z0-9_]*)"', "".join(env.values())):
        env[key_env] = environ.get(key_env, "")
    return env


def identity(settings: Settings, environ: dict[str, str] | None = None) -> str:
    """A short digest of code + settings + model environment (secrets only hashed)."""
    env = _environment(settings, dict(os.environ if environ is None else environ))
    digest = hashlib.sha256(code_digest().encode())
    digest.update(json.dumps(env, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def argv(settings: Settings, ident: str) -> list[str]:
    files = WorkerFiles(settings)
    return [sys.executable, "-m", "worker", "--ready-file", str(files.ready_file), "--identity", ident]


def live_record(settings: Settings, *, remove_stale: bool) -> PidRecord | None:
    """The recorded worker if it still runs (whatever its identity), else None.
    Only a caller holding the data dir's lock may remove a stale pid file."""
    files = WorkerFiles(settings)
    record = read_pid_file(files.pid_file)
    if record is None:
        return None
    if is_alive(record):
        return record
    if remove_stale:
        files.pid_file.unlink(missing_ok=True)
    return None


def is_ready(settings: Settings, record: PidRecord) -> bool:
    """True once that very process wrote its readiness file (it polls the queue)."""
    try:
        return json.loads(WorkerFiles(settings).ready_file.read_text()).get("pid") == record.pid
    except (OSError, ValueError, AttributeError):
        return False


def start(settings: Settings, command: list[str], *, environ: Mapping[str, str] | None = None) -> PidRecord:
    """Spawn the worker detached and record it; the caller holds the lock.
    It gets `environ` (default: this command's, with its model keys) plus
    exactly these settings."""
    files = WorkerFiles(settings)
    files.pid_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**(os.environ if environ is None else environ), **settings.to_env()}
    pid = spawn_detached(command, env=env, log_file=files.log_file, cwd=_ROOT)
    record = PidRecord(pid=pid, argv=command, ports={}, log_file=str(files.log_file))
    write_pid_file(files.pid_file, record)
    return record
