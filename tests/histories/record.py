"""Record the histories that tests/test_replay.py replays against today's code.

    python -m tests.histories.record              # every shape
    python -m tests.histories.record plain cancel # some shapes

Starts a private Temporal dev server and S3 server (as the test session does)
and the scripted model server, runs one real run of every shape in shapes.py,
and writes each run's history to tests/histories/<name>.json as
{"workflow_id": ..., "history": <WorkflowHistory.to_json()>}.

Re-record only for a deliberately incompatible workflow change that ships
behind `workflow.patched` or Worker Versioning (README: "Changing workflow
code safely"): the old files are what runs in flight look like.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

import structlog

from activities.context_store import ContextStore
from activities.object_store import ObjectStore
from cli import services as launcher
from tests.fake_llm import FakeLLM
from tests.fixtures_llm import FAKE_API_KEY_ENV, FAKE_API_KEY_VALUE, FAKE_MODEL_NAMES
from tests.histories.shapes import SHAPES, Lab

HERE = Path(__file__).resolve().parent
log = structlog.get_logger(__name__)


def write(name: str, workflow_id: str, history_json: str) -> Path:
    path = HERE / f"{name}.json"
    record = {"workflow_id": workflow_id, "history": json.loads(history_json)}
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


async def record(lab: Lab, shapes: list[str]) -> None:
    for shape in shapes:
        lab.llm.reset()
        for name, history in await SHAPES[shape](lab):
            path = write(name, history.workflow_id, history.to_json())
            log.info("history.recorded", shape=shape, file=path.name, events=len(history.events), bytes=path.stat().st_size)


def main(argv: list[str]) -> None:
    shapes = argv or list(SHAPES)
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; known: {sorted(SHAPES)}")
    os.environ[FAKE_API_KEY_ENV] = FAKE_API_KEY_VALUE  # worker subprocesses inherit it
    with tempfile.TemporaryDirectory(prefix="rlm-record-") as tmp:
        settings = launcher.private_settings(Path(tmp))
        launcher.up(settings)
        try:
            with FakeLLM(api_key=FAKE_API_KEY_VALUE, models=list(FAKE_MODEL_NAMES)) as llm:
                contexts = ContextStore(ObjectStore.from_settings(settings))
                asyncio.run(record(Lab(settings, llm, contexts, Path(tmp) / "workers.log"), shapes))
        finally:
            launcher.down(settings)
    sys.stdout.flush()
    # A process that used a Temporal client can abort at interpreter exit
    # (sdk-python#300, as in tests/fixtures_services.py): leave directly.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
