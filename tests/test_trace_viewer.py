"""`rlm ui` renders a real run (three turns, a failing cell, two child runs;
real worker, Temporal, S3, WASM; scripted models) in headless Chromium: the
DOM after the page's JavaScript ran is checked, and screenshots of the viewer
and of the same run in the Temporal UI are kept under docs/ for the README (refreshed with RLM_UPDATE_DOCS=1).

The viewer runs as a user runs it (`rlm ui` in a subprocess with RLM_*
settings); Chromium is Debian's, driven by its command line (no browser
automation dependency)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import pytest

from activities.context_store import ContextStore
from tests.fixtures_llm import fake_registry
from tests.run_harness import isolated, put_context, request, running_worker, start
from tests.trace_scenario import FAILING_CODE, QUESTION, run_scenario, script

DOCS = Path(__file__).resolve().parent.parent / "docs"
CHROMIUM = shutil.which("chromium")
# How long the page may run its JavaScript (virtual time: waits on network
# requests do not count, so this is no race against the machine's speed).
JS_BUDGET_MS = "8000"

if CHROMIUM is None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise RuntimeError("CI is set but chromium is missing: .ci/run installs it (apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium); the trace viewer test needs it", allow_module_level=True)


def _chromium(tmp_path: Path, *args: str, size: str = "1400,1000") -> subprocess.CompletedProcess:
    # --no-sandbox: Chromium refuses to start as root with its sandbox (CI
    # runs as root); the page is our own, served on loopback.
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--window-size={size}",
           f"--virtual-time-budget={JS_BUDGET_MS}", *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Node | None) -> None:
        self.tag, self.attrs, self.parent, self.kids = tag, attrs, parent, []

    def text(self) -> str:
        return "".join(k if isinstance(k, str) else k.text() for k in self.kids)

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def find_all(self, tag: str, cls: str | None = None) -> list[Node]:
        found = []
        for k in self.kids:
            if isinstance(k, Node):
                if k.tag == tag and (cls is None or cls in k.classes()):
                    found.append(k)
                found.extend(k.find_all(tag, cls))
        return found

    def summary(self) -> str:
        return next(k for k in self.kids if isinstance(k, Node) and k.tag == "summary").text()


class _Tree(HTMLParser):
    """The dumped DOM as a tree of Nodes (stdlib only)."""

    VOID = {"meta", "link", "br", "img", "input", "hr", "polyline", "path", "line"}

    def __init__(self) -> None:
        super().__init__()
        self.root = self.cur = Node("#root", {}, None)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.cur)
        self.cur.kids.append(node)
        if tag not in self.VOID:
            self.cur = node

    def handle_endtag(self, tag):
        node = self.cur
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.cur = node.parent

    def handle_data(self, data):
        self.cur.kids.append(data)


def parse(html: str) -> Node:
    tree = _Tree()
    tree.feed(html)
    return tree.root


@pytest.fixture(scope="module")
def finished_run(settings, fake_llm, object_store):
    """The scenario run to its end: (its settings, its result)."""
    return run_scenario(settings, fake_llm, object_store)


@pytest.fixture(scope="module")
def viewer(finished_run, tmp_path_factory):
    """`rlm ui --port 0` in a subprocess; yields its URL."""
    s, _ = finished_run
    env = {**os.environ, **s.to_env(), "PYTHONUNBUFFERED": "1"}
    # Its logs go to a file: a pipe nobody reads could fill and stall the server.
    log = tmp_path_factory.mktemp("rlm-ui") / "stderr.log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "ui", "--port", "0"], env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
    try:
        line = proc.stdout.readline()  # printed once the server listens
        assert line.startswith("trace viewer: http://127.0.0.1:"), f"{line!r}\n{log.read_text()[-2000:]}"
        yield line.split()[2]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _get(url: str) -> dict:
    with urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def test_viewer_page_shows_turns_failed_cell_children_and_temporal_link(finished_run, viewer, tmp_path):
    s, result = finished_run
    wid = result.workflow_id
    dom = _chromium(tmp_path, "--dump-dom", f"{viewer}#run={quote(wid, safe='')}&open=all").stdout
    page = parse(dom)
    [main] = [n for n in page.find_all("main") if n.attrs.get("id") == "run"]
    assert main.attrs.get("data-status") == "completed", main.text()[:2000]
    text = main.text()
    assert QUESTION in text and "sizes 10 and 20" in text
    # The runs list on the left names this run.
    assert any(li.attrs.get("data-id") == wid for li in page.find_all("li"))

    # Three turns, each with the model's reply.
    turns = [d for d in main.find_all("details", "turn") if d.parent is not None and d.parent.tag == "main"]
    assert [t.summary().split(" · ")[0] for t in turns] == ["Turn 1", "Turn 2", "Turn 3"]
    assert "FINAL(sizes 10 and 20)" in turns[2].text()

    # Turn 1: the failed cell with its code and error, and the llm_query batch
    # whose prompts and replies the page loaded when opened.
    cells = turns[0].find_all("details", "cell")
    failed = [c for c in cells if "bad" in c.classes()]
    assert [c.summary().split()[1] for c in failed] == ["t1c2"]
    assert FAILING_CODE in failed[0].text() and "NameError" in failed[0].text()
    items = turns[0].find_all("details", "item")
    assert len(items) == 2
    assert "say alpha" in items[0].text() and "reply to say alpha" in items[0].text()
    assert "reply to say beta" in items[1].text()

    # Turn 2: both child runs nested under the rlm_query batch, with their
    # question, status, and their own turns inside.
    children = turns[1].find_all("details", "child")
    assert len(children) == 2
    for child, question, answer in zip(children, ["Ca", "Cb"], ["10", "20"], strict=True):
        head = child.summary()
        assert "child run" in head and f"completed {question} " in head, head
        assert child.parent.tag == "details" and "batch" in child.parent.classes()
        assert child.find_all("details", "turn"), "the child's own turns are nested in it"
        assert answer in child.text()

    # Spend over time, and the link to the same run in the Temporal UI.
    assert main.find_all("svg", "chart") and "Spend over time" in text
    links = [a.attrs.get("href") for a in main.find_all("a")]
    assert f"{s.temporal_ui_url}/namespaces/default/workflows/{quote(wid, safe='')}" in links


def test_sub_call_texts_load_on_demand(finished_run, viewer):
    """The run's tree carries previews; one sub-call's whole texts come from /api/item."""
    _, result = finished_run
    wid = quote(result.workflow_id, safe="")
    tree = _get(f"{viewer}api/run?id={wid}")
    batch = tree["turns"][0]["cells"][0]["batches"][0]
    full = _get(f"{viewer}api/item?id={wid}&batch={quote(batch['id'], safe='')}&index=1")
    assert full == {"prompt": "say beta", "reply": "reply to say beta", "error": None}


@pytest.mark.parametrize("host, allowed", [
    ("attacker.example:{port}", False), ("127.0.0.1.attacker.example", False), ("", False),
    ("127.0.0.1:{port}", True), ("localhost:{port}", True), ("LOCALHOST", True),
])  # fmt: skip
def test_the_viewer_answers_only_to_local_host_names(finished_run, viewer, host, allowed):
    """A page elsewhere that rebinds its own name to 127.0.0.1 (DNS rebinding)
    is same-origin to itself: only the Host header tells it from the viewer's own page."""
    _, result = finished_run
    port = viewer.rstrip("/").rsplit(":", 1)[1]
    request = Request(f"{viewer}api/run?id={quote(result.workflow_id, safe='')}", headers={"Host": host.format(port=port)})
    try:
        with urlopen(request, timeout=60) as r:
            status, body = r.status, r.read().decode()
    except HTTPError as exc:
        status, body = exc.code, exc.read().decode()
    assert (status == 200) == allowed, (status, body[:300])
    assert allowed or "answers only to 127.0.0.1 or localhost" in body


def test_screenshots_for_the_readme(finished_run, viewer, tmp_path):
    s, result = finished_run
    wid = quote(result.workflow_id, safe="")
    # The pictures go to tmp_path; RLM_UPDATE_DOCS=1 refreshes the README's copies.
    out = DOCS if os.environ.get("RLM_UPDATE_DOCS") == "1" else tmp_path
    out.mkdir(exist_ok=True)
    shot = out / "trace-viewer.png"
    _chromium(tmp_path, f"--screenshot={shot}", f"{viewer}#run={wid}", size="1400,1650")
    assert shot.stat().st_size > 20_000
    # The same run in the Temporal UI of the session's dev server: best effort
    # (the UI is not ours), only that a real picture was taken.
    temporal = out / "temporal-ui-summaries.png"
    _chromium(tmp_path, f"--screenshot={temporal}", f"{s.temporal_ui_url}/namespaces/default/workflows/{wid}", size="1400,1300")
    assert temporal.stat().st_size > 20_000


def test_a_running_run_shows_live_status(settings, object_store, llm, viewer, tmp_path):
    """While turn 3 waits for the model, the page shows the run running, where
    it is, and keeps refreshing (what it shows comes from the live history)."""
    hold = threading.Event()
    script(llm, hold_turn3=hold)
    s = isolated(settings)
    ctx = put_context(ContextStore(object_store), "the root context")

    async def go():
        async with running_worker(s, fake_registry(llm)) as client:
            handle = await start(client, s, request(QUESTION, ctx, caps={"max_depth": 1}))
            try:
                await asyncio.to_thread(llm.wait_for_count, 1, "turn3", 60)
                url = f"{viewer}#run={quote(handle.id, safe='')}"
                return await asyncio.to_thread(_chromium, tmp_path, "--dump-dom", url)
            finally:
                hold.set()
                await asyncio.wait_for(handle.result(), 120)

    page = parse(asyncio.run(go()).stdout)
    [main] = [n for n in page.find_all("main") if n.attrs.get("id") == "run"]
    assert main.attrs.get("data-status") == "running", main.text()[:2000]
    text = main.text()
    assert "turn 3 of 20" in text, text[:2000]
    turns = [d for d in main.find_all("details", "turn") if d.parent is not None and d.parent.tag == "main"]
    assert [t.summary().split(" · ")[0] for t in turns] == ["Turn 1", "Turn 2", "Turn 3"]
    assert "(waiting for the model)" in turns[2].text()


def test_a_port_it_cannot_bind_is_one_line_error(finished_run, viewer):
    """A port in use, or past 65535 (a traceback: bind()'s OverflowError)."""
    s, _ = finished_run
    env = {**os.environ, **s.to_env()}
    in_use = viewer.rsplit(":", 1)[1].strip("/")
    for port, why in ((in_use, "address already in use"), ("99999", "port must be 0-65535")):
        proc = subprocess.run([sys.executable, "-m", "cli.main", "ui", "--port", port], env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: cannot serve on 127.0.0.1:{port} (") and why in last, last
