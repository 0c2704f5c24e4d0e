"""`rlm ui`: the trace viewer, one static page served on 127.0.0.1.

aiohttp serves `static/` (plain HTML, CSS and JavaScript, no build step) and
a small JSON API over cli/_trace.py:

- `GET /api/runs`                        recent top-level runs
- `GET /api/run?id=WID`                  one run's tree, long texts cut
- `GET /api/item?id=WID&batch=B&index=I` one sub-call's whole prompt and reply
- `GET /api/text?key=KEY`                a stored artifact (full cell output, transcript)

Sub-call texts are loaded when the user opens them; the last tree read of
each run is kept in memory for that. Nothing is stored: each request reads
Temporal and object storage again.
"""

from __future__ import annotations

import asyncio
import copy
import webbrowser
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web

from cli._errors import UserError
from cli._trace import TraceReader

if TYPE_CHECKING:
    from activities.settings import Settings

__all__ = ["build_app", "serve", "start"]

STATIC = Path(__file__).parent / "static"
HOST = "127.0.0.1"
# What a run's tree carries inline per sub-call text; the rest on demand.
ITEM_PREVIEW_CHARS = 200
# Cell output is shown whole up to this; the stored full output on demand.
OUTPUT_PREVIEW_CHARS = 20_000


def _cut(text: str | None, limit: int) -> tuple[str | None, bool]:
    if text is None or len(text) <= limit:
        return text, False
    return text[:limit], True


def slim(trace: dict[str, Any]) -> dict[str, Any]:
    """A copy of a run tree with sub-call texts cut to a preview."""
    out = copy.deepcopy(trace)

    def walk(run: dict[str, Any]) -> None:
        for turn in run.get("turns") or []:
            for cell in turn.get("cells") or []:
                cell["output"], cell["output_cut"] = _cut(cell.get("output"), OUTPUT_PREVIEW_CHARS)
                for batch in cell.get("batches") or []:
                    for item in batch["items"]:
                        item["prompt"], cut_p = _cut(item.get("prompt"), ITEM_PREVIEW_CHARS)
                        item["reply"], cut_r = _cut(item.get("reply"), ITEM_PREVIEW_CHARS)
                        item["more"] = cut_p or cut_r or bool(item.get("prompt_ref") or item.get("reply_ref"))
                        if item.get("child"):
                            walk(item["child"])

    walk(out)
    return out


def _find_run(trace: dict[str, Any], workflow_id: str) -> dict[str, Any] | None:
    if trace.get("workflow_id") == workflow_id:
        return trace
    for turn in trace.get("turns") or []:
        for cell in turn.get("cells") or []:
            for batch in cell.get("batches") or []:
                for item in batch["items"]:
                    if item.get("child") and (found := _find_run(item["child"], workflow_id)):
                        return found
    return None


class Viewer:
    def __init__(self, reader: TraceReader) -> None:
        self.reader = reader
        self._last: dict[str, dict[str, Any]] = {}

    async def runs(self, request: web.Request) -> web.Response:
        return web.json_response({"runs": await self.reader.list_runs()})

    async def run(self, request: web.Request) -> web.Response:
        workflow_id = _param(request, "id")
        trace = await self.reader.load(workflow_id)
        self._last[workflow_id] = trace
        return web.json_response(slim(trace))

    async def item(self, request: web.Request) -> web.Response:
        workflow_id, batch_id = _param(request, "id"), _param(request, "batch")
        index = int(_param(request, "index"))
        found = None
        for top in list(self._last.values()):
            if (found := _find_run(top, workflow_id)) is not None:
                break
        if found is None:
            found = await self.reader.load(workflow_id, children=False)
        for turn in found["turns"]:
            for cell in turn["cells"]:
                for batch in cell["batches"]:
                    if batch["id"] == batch_id and 0 <= index < len(batch["items"]):
                        item = batch["items"][index]
                        prompt = await self._text(item.get("prompt"), item.get("prompt_ref"))
                        reply = await self._text(item.get("reply"), item.get("reply_ref"))
                        return web.json_response({"prompt": prompt, "reply": reply, "error": item.get("answer_error") or item.get("error")})
        raise web.HTTPNotFound(text=f"no sub-call {batch_id}[{index}] in run {workflow_id}")

    async def text(self, request: web.Request) -> web.Response:
        return web.Response(text=await asyncio.to_thread(self.reader.read_text, _param(request, "key")))

    async def _text(self, inline: str | None, key: str | None) -> str | None:
        if key:
            return await asyncio.to_thread(self.reader.read_text, key)
        return inline

    async def config(self, request: web.Request) -> web.Response:
        s = self.reader.settings
        return web.json_response({"temporal_ui": s.temporal_ui_url, "namespace": s.temporal_namespace})


def _param(request: web.Request, name: str) -> str:
    value = request.query.get(name)
    if not value:
        raise web.HTTPBadRequest(text=f"missing query parameter {name!r}")
    return value


# The names a browser on this machine uses for the viewer. Any other Host is
# a page elsewhere that rebound its own name to 127.0.0.1 (DNS rebinding) to
# read runs, prompts and cell outputs through the viewer: refused.
_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


@web.middleware
async def _local_only(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        host = urlsplit("//" + request.headers.get("Host", "")).hostname
    except ValueError:  # not a host at all ("[")
        host = None
    if host not in _LOCAL_HOSTS:
        raise web.HTTPForbidden(text="the run viewer answers only to 127.0.0.1 or localhost")
    return await handler(request)


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Expected failures reach the page as a 4xx/5xx with one line of text."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except UserError as exc:
        raise web.HTTPNotFound(text=str(exc)) from None
    except Exception as exc:  # storage or Temporal trouble: say what, keep serving
        raise web.HTTPBadGateway(text=f"{type(exc).__name__}: {exc}") from None


def build_app(reader: TraceReader) -> web.Application:
    viewer = Viewer(reader)
    app = web.Application(middlewares=[_local_only, _errors])
    app.router.add_get("/api/runs", viewer.runs)
    app.router.add_get("/api/run", viewer.run)
    app.router.add_get("/api/item", viewer.item)
    app.router.add_get("/api/text", viewer.text)
    app.router.add_get("/api/config", viewer.config)
    app.router.add_get("/", lambda _r: web.FileResponse(STATIC / "index.html"))
    app.router.add_static("/static/", STATIC)
    return app


async def start(settings: Settings, port: int = 0) -> tuple[web.AppRunner, str]:
    """Start the viewer on 127.0.0.1:`port` (0 = a free port); returns its URL."""
    reader = await TraceReader.open(settings)
    runner = web.AppRunner(build_app(reader), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, port)
    try:
        await site.start()
    except (OSError, OverflowError) as exc:  # OverflowError: a port past 65535
        await runner.cleanup()
        why = getattr(exc, "strerror", None) or str(exc)
        raise UserError(
            f"cannot serve on {HOST}:{port} ({why}): pass another --port (1-65535, or 0 for a free one)"
        ) from None
    bound = runner.addresses[0][1]
    return runner, f"http://{HOST}:{bound}/"


async def serve(settings: Settings, *, port: int, open_browser: bool = False) -> None:
    """Serve until interrupted."""
    runner, url = await start(settings, port)
    print(f"trace viewer: {url} (Ctrl-C to stop)", flush=True)
    if open_browser:
        webbrowser.open(url)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
