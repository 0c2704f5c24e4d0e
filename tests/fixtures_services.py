"""Real servers for the test session: Temporal dev server and S3 (SeaweedFS).

Started once per session through the project's own launcher (`cli.services`)
on free loopback ports in a temporary data dir, and stopped at the end, so
tests never touch a user's `rlm up` services.

- `services` (session): the running pair; `.settings` points at them.
- `settings` (session): that Settings; pass `settings.to_env()` to subprocesses.
- `object_store` (session): an ObjectStore on the session bucket.
- `context_store` (function): a fresh ContextStore (empty manifest cache).
- `isolated_settings(data_dir)`: Settings on new free ports, ignoring RLM_*
  variables of the environment (for tests that start their own pair).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from activities.context_store import ContextStore
from activities.object_store import ObjectStore
from activities.settings import Settings
from cli import services as launcher

__all__ = ["RunningServices", "isolated_settings"]


@dataclass
class RunningServices:
    """The session's Temporal and S3 servers."""

    settings: Settings
    status: launcher.ServicesStatus


def isolated_settings(data_dir: Path, **overrides: object) -> Settings:
    """Settings for a private pair of servers on fresh free ports, immune to
    RLM_* variables of the environment."""
    return launcher.private_settings(data_dir, **overrides)


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServices]:
    settings = isolated_settings(tmp_path_factory.mktemp("rlm-services"))
    status = launcher.up(settings)
    try:
        yield RunningServices(settings=settings, status=status)
    finally:
        launcher.down(settings)


@pytest.fixture(scope="session")
def settings(services: RunningServices) -> Settings:
    return services.settings


@pytest.fixture(scope="session")
def object_store(settings: Settings) -> ObjectStore:
    return ObjectStore.from_settings(settings)


@pytest.fixture
def context_store(object_store: ObjectStore) -> ContextStore:
    return ContextStore(object_store)


_exit_status: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    # A process that used a Temporal client can abort at interpreter exit
    # (PyGILState_Release, rc 134; sdk-python#300). Everything is reported
    # and torn down by now: flush and leave with pytest's own exit status.
    if _exit_status and "temporalio.client" in sys.modules and not hasattr(config, "workerinput"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[-1])
