"""`rlm up`, `rlm status`, `rlm down`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from activities.settings import Settings
from activities.terminal_text import printable

if TYPE_CHECKING:  # the launcher is imported by the commands that use it, not by every `rlm`
    from cli import services

__all__ = ["register"]


def _render(status: services.ServicesStatus, settings: Settings) -> str:
    lines = [f"data dir   {status.data_dir}"]
    for label, svc in (("temporal", status.temporal), ("s3", status.s3)):
        pid = f"pid {svc.pid}" if svc.pid else "no pid"
        lines.append(f"{label:<10} {svc.address:<21} {pid:<10} {svc.detail}")
        lines.append(f"{'':<10} log {svc.log_file}")
    if status.worker is not None:
        w = status.worker
        pid = f"pid {w.pid}" if w.pid else "no pid"
        lines.append(f"{'worker':<10} {w.address:<21} {pid:<10} {w.detail}")
        lines.append(f"{'':<10} log {w.log_file}")
    if status.local_model is not None:
        lm = status.local_model
        pid = f"pid {lm['pid']}" if lm.get("pid") else "no pid"
        lines.append(f"{'local LLM':<10} {lm['url']!s:<21} {pid:<10} {lm['detail']}")
    lines.append(f"web UI     {status.ui_url}")
    lines.append(f"bucket     {settings.s3_bucket}  (credentials: {settings.credentials_file})")
    lines.append(f"namespace  {settings.temporal_namespace}  task queue {settings.task_queue}")
    return "\n".join(lines)


def _print_status(status: services.ServicesStatus, settings: Settings, as_json: bool) -> int:
    if as_json:
        sys.stdout.write(json.dumps(status.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(printable(_render(status, settings)) + "\n")
    return 0 if status.healthy else 1


def _up(args: argparse.Namespace, settings: Settings) -> int:
    from cli import services

    return _print_status(services.up(settings, timeout=args.timeout or services.READY_TIMEOUT_S), settings, args.json)


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from cli import services

    return _print_status(services.status(settings), settings, args.json)


def _down(args: argparse.Namespace, settings: Settings) -> int:
    from cli import services

    stopped = services.down(settings, timeout=args.timeout or services.STOP_TIMEOUT_S)
    sys.stdout.write(f"stopped: {', '.join(stopped)}\n" if stopped else "nothing was running\n")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    up = subparsers.add_parser(
        "up", help="start the embedded Temporal and S3 servers, a worker, and the local model if installed "
        "(reuses running ones; restarts the worker when the code or settings changed)"
    )
    up.add_argument("--timeout", type=float, default=None, help="seconds to wait for readiness (default: 60)")
    up.add_argument("--json", action="store_true", help="print the status as JSON")
    up.set_defaults(handler=_up)

    status = subparsers.add_parser(
        "status", help="show what runs where (exit code 1 if a service does not answer)"
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(handler=_status)

    down = subparsers.add_parser("down", help="stop the embedded servers and workers")
    down.add_argument(
        "--timeout", type=float, default=None, help="seconds before SIGKILL (default: 15)"
    )
    down.set_defaults(handler=_down)
