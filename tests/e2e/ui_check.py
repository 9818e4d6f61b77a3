"""`make ui-check`: the study in the real MLflow UI, seen by a headless browser.

    python -m tests.e2e.ui_check --study NAME [--tracking-uri URI] [--out DIR] [--chromium PATH]

1. Reads the study's latest sweep from the store (as the report does) and checks that every
   finished variant has its headline metrics (`ablation/*`, see sdxl_ablate/evaluate/headline.py)
   and that no run of it is still RUNNING (no status recorded).
2. Starts `mlflow ui` on 127.0.0.1 on a free port over the same store and asks its REST API
   for the same runs and metrics: what the UI will show. The experiment must hold the report's
   view of the latest sweep (`mlflow.sharedViewState.ablation`, written by the report).
3. Opens Debian's chromium headless (install: `apt-get update && apt-get install -y chromium`)
   and does what the README's clicks say, writing a screenshot of each into DIR (default
   reports/<study>/ui/): `first_screen` (the report's view, no click: the sweep's variants with
   their headline columns), `runs_table` (the sweep's variants, headline columns added through the
   sort menu), `chart_view` (it must open on the `ablation/*` section), `loss_overlay` (the
   chart search set to train/loss), `compare_runs` (the compare view's scatter plot of
   ablation/peak_memory_gib against the score), and `image_slider` (the `samples/*` images of
   every run in one image grid at the last step, full screen; only when samples were logged).
   Each page must show the runs (and what its step set up).

Exits 0 when all of that holds, 1 naming what is missing, 2 when it cannot run (no
chromium, no study, the server did not start).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# What every finished variant must carry for the comparison that matters.
HEADLINE = ("ablation/peak_memory_gib", "ablation/images_per_s", "ablation/final_loss")
# ... and, where it was evaluated, its scores.
EVALUATED = ("ablation/clip_style_lift", "ablation/heldout_loss_drop")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--disable-dev-shm-usage")
WINDOW = "1680,1050"


def _button(label: str) -> str:
    return f"[...document.querySelectorAll('button')].find(b => b.getAttribute('aria-label') === {label!r})"


def _sort_by(metric: str) -> list[tuple]:
    # Picking a sort key in the runs table also adds its column: the table then shows it.
    return [("click", "document.querySelector('[data-testid=sort-select-dropdown]')"),
            ("click", f"document.querySelector('[data-testid=\"sort-select-{metric}\"]')")]


def _search_charts(text: str) -> list[tuple]:
    # Real key presses into the field (React reads its own input events), as a person types;
    # first the charts get a moment to fetch their data: a line chart filtered before its
    # history arrived stayed hidden as empty.
    return [("wait", 3.0), ("focus", "[...document.querySelectorAll('input')].find(i => (i.placeholder || '')"
                      ".startsWith('Search metric charts'))"), ("type", text), ("wait", 2.0)]


def _leaf(text: str, within: str = "") -> str:
    """JS: the innermost element (no child elements) showing exactly that text, under `within`
    (a CSS selector; the whole page when empty): how titles and headers are found."""
    return (f"[...document.querySelectorAll('{within} *'.trim())].find(e => e.childElementCount === 0 && "
            f"e.innerText === {text!r})")


def _scroll_to_section(name: str) -> str:
    return f"(() => {{ const h = {_leaf(name)}; if (h) h.scrollIntoView({{block: 'start'}}); }})()"


def _pick(selector_id: str, option: str) -> list[tuple]:
    """Open a select of the compare view (its id) and click the option with that text."""
    return [("click", f"document.getElementById({selector_id!r})"),
            ("click", f"[...document.querySelectorAll('[role=option]')].find(o => o.innerText === {option!r})")]


_UNSELECTED = "[...document.querySelectorAll('[role=option]')].find(o => o.getAttribute('aria-selected') === 'false')"


def _image_grid(last_step: int, keys: int) -> list[tuple]:
    """The image slider as a person sets it up (README, step 5): on the first `samples/` card,
    Configure; every image key in one grid; run parameters off (they cover the images); the
    step slider at the last step; save; open the new grid full screen."""
    return [*_search_charts("samples/"),
            ("click", "document.querySelector('[data-testid=experiment-view-compare-runs-card-menu]')"),
            ("click", "document.querySelector('[data-testid=experiment-view-compare-runs-card-edit]')"),
            ("wait", 2.0),
            ("click", "document.querySelector('[role=dialog] button[role=switch][aria-checked=true]')"),
            ("click", "document.querySelector('[role=dialog] button[role=combobox]')"),
            *[step for _ in range(keys - 1) for step in (("click", _UNSELECTED), ("wait", 0.5))],
            # Closes the list by a click on the dialog's title, above it (the list covers the rest).
            ("click", _leaf("Edit chart", within="[role=dialog]")),
            ("focus", "document.querySelector('[role=dialog] input[type=number]')"),
            ("js", "document.activeElement.select()"), ("type", str(last_step)), ("key", "Enter"), ("wait", 1.0),
            ("click", "document.querySelector('[data-testid=experiment-view-compare-runs-chart-modal-confirm]')"),
            ("wait", 2.0),
            _fullscreen("Image grid"), ("wait", 3.0)]


def _fullscreen(title: str) -> tuple:
    """Click the full-screen button of the chart card with that title."""
    return ("click", f"(() => {{ let c = {_leaf(title)}; while (c && !c.querySelector("
                     "'[data-component-id=fullscreen_button_chartcard]')) c = c.parentElement; "
                     "return c && c.querySelector('[data-component-id=fullscreen_button_chartcard]'); })()")


# Checks run in the page after the actions; each returns the list of what is missing.
# A section header renders as its name, then "(<number of charts>)" on the next line.
SECTION_ORDER_JS = ("(() => { const l = document.body.innerText.split('\\n'); const s = l.map((x, i) => "
                    "/^\\(\\d+\\)$/.test(x) ? l[i - 1] : null).filter(Boolean); return s[0] === 'ablation' ? [] : "
                    "[`the ablation/* charts as the first section (sections: ${s.join(', ')})`]; })()")


def _selected_js(selector_id: str, option: str) -> str:
    return (f"(() => {{ const e = document.getElementById({selector_id!r}); return e && "
            f"e.innerText.trim() === {option!r} ? [] : [{f'{option} on {selector_id}'!r}]; }})()")


def _dialog_js(title: str) -> str:
    return (f"(() => {{ const d = document.querySelector('[role=dialog]'); return d && d.innerText.includes({title!r})"
            f" ? [] : [{f'{title} full screen'!r}]; }})()")


def _images_js(runs: int, keys: int) -> str:
    # The grid renders the columns (runs) in view, about ten: every rendered image must have
    # loaded, and at least all keys of the first min(runs, 4) runs must be there.
    want = keys * min(runs, 4)
    return ("(() => { const imgs = [...document.querySelectorAll('[role=dialog] img')]; const loaded = imgs.filter("
            "i => i.complete && i.naturalWidth > 0).length; const out = []; "
            f"if (loaded < {want}) out.push(`${{loaded}} of at least {want} sample images ({keys} keys x "
            f"{min(runs, 4)} runs) in the full-screen image grid`); if (loaded < imgs.length) "
            "out.push(`${imgs.length - loaded} sample images that did not load`); return out; })()")


@dataclass
class Page:
    """One screenshot: the page, the texts it shows once loaded (awaited before acting), what a
    person does on it, then the texts it must show and JS checks (each returns what is missing)."""

    url: str
    ready: list[str]
    actions: list[tuple] = field(default_factory=list)
    expect: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)


# What the check does first on every page: close the assistant panel.
COMMON_ACTIONS = [("click", _button("Close"))]


class UiCheckError(RuntimeError):
    """The check cannot run (exit 2)."""


@dataclass
class Expected:
    study: str
    experiment_id: str
    sweep_ids: list[str]
    runs: dict[str, str]  # run id -> run name (the variant runs of the sweep)
    ok: list[str]  # run ids of the finished variants
    score: str = "ablation/final_loss"  # the y axis of score vs memory
    image_keys: int = 0  # `samples/*` keys of the first finished run (0: no samples logged)
    reused: bool = False  # the sweep reused runs an earlier sweep finished (their sweep_id differs)
    last_step: int = 0  # its last training step (the image slider's end)
    view_columns: list[str] = field(default_factory=list)  # the report's shared view: its metric columns


def _image_keys(client, run_id: str) -> int:
    """How many image keys a run logged with `log_image(key=..., step=...)`: MLflow stores each
    image as images/<key with / as ~>+step+<step>+...; the key is the part before `+step+`."""
    try:
        names = [Path(a.path).name for a in client.list_artifacts(run_id, "images")]
    except Exception:  # noqa: BLE001 - a store without artifacts: no image page
        return 0
    return len({n.split("+step+")[0] for n in names if "+step+" in n})


def expected_runs(uri: str, study: str) -> tuple[Expected, list[str]]:
    """The sweep's variant runs from the store, and the problems found there."""
    from mlflow.tracking import MlflowClient

    from sdxl_ablate.report.runs import ReportError, read_runs, select_runs
    from sdxl_ablate.report.study import LATEST_VIEW, VIEW_TAG

    client = MlflowClient(uri)
    try:
        runs, sweep_ids = select_runs(read_runs(client, study, None))
    except ReportError as e:
        raise UiCheckError(str(e)) from e
    problems = []
    for r in runs:
        if r.status == "running":  # no end recorded: still going, or its process died unseen
            problems.append(f"run {r.name} ({r.run_id}) is RUNNING (no status recorded): the sweep is not "
                            "finished, or the run was cut off; its numbers are not final")
            continue
        if r.status != "ok":
            continue
        # A random CLIP (eval=tiny) has no CLIP headline: its scores are a smoke test.
        evaluated = tuple(m for m in EVALUATED if not (m.startswith("ablation/clip_")
                                                        and r.metrics.get("eval/clip_random") == 1.0))
        needed = HEADLINE + (evaluated if "eval/heldout_loss" in r.metrics else ())
        missing = [m for m in needed if m not in r.metrics]
        if missing:
            problems.append(f"run {r.name} ({r.run_id}) lacks {', '.join(missing)}")
    ok = [r for r in runs if r.status == "ok"]
    if not ok:
        problems.append(f"no finished variant run in sweep {', '.join(sweep_ids)}")
    experiment = client.get_experiment_by_name(study)
    exp = experiment.experiment_id
    # The first screen: the report's shared view of the latest sweep (report/study.py, LATEST_VIEW).
    view = experiment.tags.get(VIEW_TAG + LATEST_VIEW)
    if view is None:
        problems.append(f"the experiment has no report view ({VIEW_TAG}{LATEST_VIEW}): run "
                        f"`python -m sdxl_ablate.report --study {study}` first")
    expected = Expected(study, exp, sweep_ids, {r.run_id: r.name for r in runs}, [r.run_id for r in ok])
    expected.reused = any(r.tags.get("sweep_id") not in sweep_ids for r in runs)
    if view is not None:
        expected.view_columns = [c.removeprefix("metrics.`").removesuffix("`")
                                 for c in json.loads(view).get("selectedColumns", []) if c.startswith("metrics.")]
    # The score of the score-vs-memory plot: the best one every finished run has.
    expected.score = next((m for m in ("ablation/clip_style_lift", "ablation/heldout_loss_drop")
                           if ok and all(m in r.metrics for r in ok)), "ablation/final_loss")
    if ok:
        expected.image_keys = _image_keys(client, ok[0].run_id)
        expected.last_step = int(ok[0].metrics.get("train/steps", 0))
    return expected, problems


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Ends a process started in its own session and everything it started."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def start_server(uri: str, port: int, log_path: Path) -> subprocess.Popen:
    log = log_path.open("w")
    # Its own process group: `mlflow ui` starts uvicorn and a job runner, which must stop with it.
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UiCheckError(f"mlflow ui exited with code {proc.returncode}; its log: {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise UiCheckError(f"mlflow ui did not answer on 127.0.0.1:{port} within 120 s; its log: {log_path}")


def api_runs(port: int, experiment_id: str) -> dict[str, dict]:
    """run id -> the run as the server's REST API returns it."""
    body = json.dumps({"experiment_ids": [experiment_id], "max_results": 1000}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return {run["info"]["run_id"]: run for run in json.load(r).get("runs", [])}


def api_problems(expected: Expected, served: dict[str, dict]) -> list[str]:
    problems = []
    for run_id, name in expected.runs.items():
        if run_id not in served:
            problems.append(f"the server does not list run {name} ({run_id})")
            continue
        metrics = {m["key"] for m in served[run_id]["data"].get("metrics", [])}
        if run_id in expected.ok and not set(HEADLINE) <= metrics:
            problems.append(f"the server shows run {name} without {', '.join(sorted(set(HEADLINE) - metrics))}")
    return problems


def pages(port: int, expected: Expected) -> dict[str, Page]:
    """The pages to capture, each set up as the README's clicks say: the runs table (variants of
    the sweep, headline columns), the chart view (the ablation/* section first), the loss
    overlay, score vs memory in the compare view, and the image slider (when samples exist)."""
    base = f"http://127.0.0.1:{port}/#/experiments/{expected.experiment_id}"
    # MLflow's filters drop a run without the tag, so runs from before kind tags existed are
    # found by the study tag every variant run carries (a report run has none).
    flt = f"tags.study = '{expected.study}'"
    if expected.reused:  # runs of earlier sweeps belong to this one: name them
        flt = "attributes.run_id IN (" + ", ".join(f"'{i}'" for i in expected.runs) + ")"
    elif expected.sweep_ids != ["legacy"]:
        flt = f"tags.kind = 'variant' and tags.sweep_id = '{expected.sweep_ids[0]}'"
    # workflowType: the side bar in its model-training mode (the UI's default is GenAI).
    query = urllib.parse.urlencode({"searchFilter": flt, "orderByKey": "metrics.`ablation/peak_memory_gib`",
                                    "orderByAsc": "true", "workflowType": "machine_learning"},
                                   quote_via=urllib.parse.quote)
    ids = json.dumps(expected.ok or list(expected.runs))
    compare = urllib.parse.urlencode({"runs": ids, "experiments": json.dumps([expected.experiment_id])},
                                     quote_via=urllib.parse.quote)
    names = list(expected.runs.values())
    ok_names = [expected.runs[i] for i in expected.ok]
    charts = f"{base}/runs?{query}&compareRunsMode=CHART"
    out = {
        # What `make mlflow-ui` and the report's link open on: the variants with their headline
        # columns, no click (the parents that fold the variants in the plain table are not shown).
        "first_screen": Page(f"{base}/runs?viewStateShareKey=ablation&workflowType=machine_learning", names,
                             expect=[*names, *expected.view_columns]),
        "runs_table": Page(f"{base}/runs?{query}", names,
                           [step for m in ("ablation/peak_memory_gib", "ablation/images_per_s",
                                           "ablation/heldout_loss_drop", expected.score) for step in _sort_by(m)]
                           + [("click", "document.querySelector('[data-testid=sort-select-dropdown]')"),
                              ("click", "document.querySelector('[data-testid=sort-select-desc]')")],
                           expect=names),
        "chart_view": Page(charts, ["ablation/peak_memory_gib"], checks=[SECTION_ORDER_JS]),
        # The search does not filter image cards: the `samples` section stays above the chart.
        "loss_overlay": Page(charts, ["ablation/peak_memory_gib"],
                             [*_search_charts("train/loss"), ("js", _scroll_to_section("train")), ("wait", 2.0),
                              _fullscreen("train/loss"), ("wait", 2.0)],
                             expect=["train/loss"], checks=[_dialog_js("train/loss")]),
        "compare_runs": Page(f"http://127.0.0.1:{port}/#/compare-runs?{compare}", ok_names,
                             [("click", "[...document.querySelectorAll('[role=tab]')].find(t => "
                                        "t.innerText === 'Scatter Plot')"), ("wait", 1.0),
                              *_pick("x-axis-selector", "ablation/peak_memory_gib"),
                              *_pick("y-axis-selector", expected.score)],
                             expect=ok_names,
                             checks=[_selected_js("x-axis-selector", "ablation/peak_memory_gib"),
                                     _selected_js("y-axis-selector", expected.score)]),
    }
    if expected.image_keys:
        out["image_slider"] = Page(charts, ["ablation/peak_memory_gib"],
                                   _image_grid(expected.last_step, expected.image_keys),
                                   expect=["Image grid"], checks=[_images_js(len(expected.ok), expected.image_keys)])
    return out


def find_chromium(path: Optional[str]) -> str:
    for candidate in ([path] if path else ["chromium", "chromium-browser", "google-chrome"]):
        found = shutil.which(candidate) if candidate else None
        if found:
            return found
    raise UiCheckError("no chromium found; install Debian's: apt-get update && apt-get install -y chromium "
                       "(or pass --chromium PATH)")


class Browser:
    """One headless chromium, driven over the DevTools protocol (aiohttp's websocket client):
    each page is loaded, awaited until it shows what it must (or a timeout), then captured."""

    def __init__(self, binary: str, log_path: Path):
        # A fresh profile; what a crashed helper leaves in it must not fail the check.
        self.profile = tempfile.TemporaryDirectory(prefix="ui-check-profile-", ignore_cleanup_errors=True)
        self.log = log_path.open("w")
        self.proc = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile.name}", "--remote-debugging-port=0",
             f"--window-size={WINDOW}", "about:blank"], stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        port_file = Path(self.profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise UiCheckError(f"chromium did not start (exit {self.proc.returncode}); its log: {log_path}")
            time.sleep(0.2)
        self.port = int(port_file.read_text().split()[0])
        self._id = 0

    def close(self) -> None:
        # Chromium's helper processes (renderer, GPU, zygote) go with it: they write into the
        # profile until they end, and a profile removed under them fails the cleanup.
        stop(self.proc)
        self.log.close()
        self.profile.cleanup()

    async def _call(self, ws, method: str, **params) -> dict:
        self._id += 1
        await ws.send_json({"id": self._id, "method": method, "params": params})
        while True:
            msg = await ws.receive_json()
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise UiCheckError(f"chromium: {method}: {msg['error']}")
                return msg.get("result", {})

    async def _js(self, ws, expression: str):
        result = await self._call(ws, "Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def _act(self, ws, action: tuple) -> None:
        """("click", JS expression of an element) with a real mouse click (the UI's menus open
        on pointer events); ("focus", element); ("type", text) into the focused field; ("key", name)
        pressed; ("js", expression); ("wait", s).
        An element that is not there is skipped: the checks above decide pass or fail."""
        kind, arg = action
        if kind == "click":
            box = await self._js(ws, f"(() => {{ const e = {arg}; if (!e) return null; e.scrollIntoView({{block: "
                                     "'center'}); const r = e.getBoundingClientRect(); "
                                     "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
            if box:
                for kind in ("mousePressed", "mouseReleased"):
                    await self._call(ws, "Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left",
                                     clickCount=1)
                await asyncio.sleep(0.8)
        elif kind == "focus":
            await self._js(ws, f"(() => {{ const e = {arg}; if (e) {{ e.scrollIntoView(); e.focus(); }} }})()")
            await asyncio.sleep(0.3)
        elif kind == "type":
            # Key by key, as a person types: the chart search ignored a whole string inserted at once.
            for char in arg:
                await self._call(ws, "Input.insertText", text=char)
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.8)
        elif kind == "key":
            for event in ("keyDown", "keyUp"):
                await self._call(ws, "Input.dispatchKeyEvent", type=event, key=arg, code=arg,
                                 windowsVirtualKeyCode={"Enter": 13, "Escape": 27}.get(arg, 0))
            await asyncio.sleep(0.5)
        elif kind == "js":
            await self._js(ws, arg)
            await asyncio.sleep(0.8)
        else:
            await asyncio.sleep(arg)

    async def _text(self, ws) -> str:
        result = await self._call(ws, "Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                                  returnByValue=True)
        return result.get("result", {}).get("value", "")

    async def _capture(self, pages: dict[str, Page], out: Path, timeout_s: float) -> dict[str, list[str]]:
        import aiohttp

        missing: dict[str, list[str]] = {}
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{self.port}/json/list") as r:
                target = next(t for t in await r.json() if t["type"] == "page")
            async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                width, height = map(int, WINDOW.split(","))
                await self._call(ws, "Emulation.setDeviceMetricsOverride", width=width, height=height,
                                 deviceScaleFactor=1, mobile=False)
                for name, page in pages.items():
                    await self._call(ws, "Page.navigate", url="about:blank")
                    await self._call(ws, "Page.navigate", url=page.url)
                    deadline = time.monotonic() + timeout_s
                    while time.monotonic() < deadline:
                        text = await self._text(ws)
                        if all(e in text for e in page.ready):
                            break
                        await asyncio.sleep(0.5)
                    for action in [*COMMON_ACTIONS, *page.actions]:
                        await self._act(ws, action)
                    await asyncio.sleep(2.0)  # charts animate in after their data arrives
                    text = await self._text(ws)  # what the page shows now, as captured
                    absent = [e for e in [*page.ready, *page.expect] if e not in text]
                    for check in page.checks:
                        absent += await self._js(ws, check) or []
                    shot = await self._call(ws, "Page.captureScreenshot", format="png")
                    (out / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))
                    missing[name] = list(dict.fromkeys(absent))
        return missing

    def capture(self, pages: dict[str, Page], out: Path, timeout_s: float = 90) -> dict[str, list[str]]:
        """{page name: Page} -> {page name: what it did not show}; a screenshot of each page as
        <out>/<name>.png."""
        return asyncio.run(self._capture(pages, out, timeout_s))


def main(argv: Optional[list[str]] = None) -> int:
    from sdxl_ablate.config import TrackingConfig
    from sdxl_ablate.track.tracker import resolve_uri

    p = argparse.ArgumentParser(prog="python -m tests.e2e.ui_check", description=__doc__.split("\n")[0])
    p.add_argument("--study", required=True)
    p.add_argument("--tracking-uri", default=None, help="default: sqlite:///<cwd>/mlflow.db")
    p.add_argument("--out", type=Path, default=None, help="screenshots folder (default: reports/<study>/ui)")
    p.add_argument("--chromium", default=None, help="the browser binary (default: chromium on PATH)")
    args = p.parse_args(argv)
    uri = args.tracking_uri or resolve_uri(TrackingConfig())
    if not uri.startswith(("sqlite:", "postgresql:", "mysql:", "mssql:")):
        print(f"error: --tracking-uri {uri}: ui-check starts its own mlflow ui over a database store "
              "(sqlite:///..., postgresql://...)", file=sys.stderr)
        return 2
    out = args.out or Path("reports") / args.study / "ui"
    out.mkdir(parents=True, exist_ok=True)
    server = None
    try:
        binary = find_chromium(args.chromium)
        expected, problems = expected_runs(uri, args.study)
        if problems:  # the store already says the UI cannot show the answer: no browser needed
            print("ui-check FAILED:\n  - " + "\n  - ".join(problems), file=sys.stderr)
            return 1
        port = free_port()
        server = start_server(uri, port, out / "mlflow-ui.log")
        problems += api_problems(expected, api_runs(port, expected.experiment_id))
        shots = pages(port, expected)
        browser = Browser(binary, out / "chromium.log")
        try:
            missing = browser.capture(shots, out)
        finally:
            browser.close()
        for name, absent in missing.items():
            if absent:
                problems.append(f"the {name.replace('_', ' ')} page does not show {', '.join(absent)}")
            print(f"{name}: {shots[name].url}\n  -> {out / f'{name}.png'}"
                  + (f" (missing: {', '.join(absent)})" if absent else ""))
        if not expected.image_keys:
            print("image_slider: skipped: the runs logged no samples/ images (eval.every_n_steps is off)")
    except UiCheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            stop(server)
    if problems:
        print("ui-check FAILED:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 1
    print(f"ui-check ok: {len(expected.runs)} runs of sweep {', '.join(expected.sweep_ids)} with their headline "
          f"metrics, in the API and on the pages; screenshots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
