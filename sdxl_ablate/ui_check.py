"""`make ui-check`: the study in the real MLflow UI, seen by a headless browser.

    python -m sdxl_ablate.ui_check --study NAME [--tracking-uri URI] [--out DIR] [--chromium PATH]

1. Reads the study's latest sweep from the store (as the report does) and checks that every
   finished variant has its headline metrics (`ablation/*`, see sdxl_ablate/summary.py).
2. Starts `mlflow ui` on 127.0.0.1 on a free port over the same store and asks its REST API
   for the same runs and metrics: what the UI will show.
3. Opens Debian's chromium headless (install: `apt-get update && apt-get install -y chromium`)
   on the study's runs table (variants only, headline columns), the chart view, and the
   compare view of the sweep's runs; checks the rendered pages name every variant run; writes
   screenshots into DIR (default reports/<study>/ui/).

Exits 0 when all of that holds, 1 naming what is missing, 2 when it cannot run (no
chromium, no study, the server did not start).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
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


# What the check does on each page before its screenshot, as a person would: close the
# assistant panel; in the runs table show the headline columns (sorted by the score); in the
# chart view show the summary charts only; in the compare view, the metrics that differ.
COMMON_ACTIONS = [("click", _button("Close"))]
ACTIONS = {
    "runs_table": [step for m in ("ablation/peak_memory_gib", "ablation/images_per_s", "ablation/heldout_loss_drop",
                                  "ablation/clip_style_lift") for step in _sort_by(m)]
                  + [("click", "document.querySelector('[data-testid=sort-select-dropdown]')"),
                     ("click", "document.querySelector('[data-testid=sort-select-desc]')")],
    # A React-controlled field: set through the native setter, then tell React with an input event.
    "chart_view": [("js", "(() => { const e = [...document.querySelectorAll('input')].find(i => "
                          "(i.placeholder || '').startsWith('Search metric charts')); if (!e) return; "
                          "Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(e, "
                          "'ablation/'); e.dispatchEvent(new Event('input', {bubbles: true})); })()"), ("wait", 2.0)],
    # The compare view opens on the parallel-coordinates plot of the axes that differ.
    "compare_runs": [("click", "[...document.querySelectorAll('button[role=switch]')].find(b => "
                               "(b.parentElement.innerText || '').includes('Show diff only'))")],
}


class UiCheckError(RuntimeError):
    """The check cannot run (exit 2)."""


@dataclass
class Expected:
    study: str
    experiment_id: str
    sweep_ids: list[str]
    runs: dict[str, str]  # run id -> run name (the variant runs of the sweep)
    ok: list[str]  # run ids of the finished variants


def expected_runs(uri: str, study: str) -> tuple[Expected, list[str]]:
    """The sweep's variant runs from the store, and the problems found there."""
    from mlflow.tracking import MlflowClient

    from .report import ReportError, read_runs, select_runs

    client = MlflowClient(uri)
    try:
        runs, sweep_ids = select_runs(read_runs(client, study, None))
    except ReportError as e:
        raise UiCheckError(str(e)) from e
    problems = []
    for r in runs:
        if r.status != "ok":
            continue
        needed = HEADLINE + (EVALUATED if "eval/heldout_loss" in r.metrics else ())
        missing = [m for m in needed if m not in r.metrics]
        if missing:
            problems.append(f"run {r.name} ({r.run_id}) lacks {', '.join(missing)}")
    if not any(r.status == "ok" for r in runs):
        problems.append(f"no finished variant run in sweep {', '.join(sweep_ids)}")
    exp = client.get_experiment_by_name(study).experiment_id
    return Expected(study, exp, sweep_ids, {r.run_id: r.name for r in runs}, [r.run_id for r in runs if r.status == "ok"]), problems


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(uri: str, port: int, log_path: Path) -> subprocess.Popen:
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
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
    proc.terminate()
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


def ui_urls(port: int, expected: Expected) -> dict[str, str]:
    """The pages to capture: the runs table (variants of the sweep, headline metrics first),
    the chart view, and the compare view of the sweep's finished runs."""
    base = f"http://127.0.0.1:{port}/#/experiments/{expected.experiment_id}"
    # MLflow's filters drop a run without the tag, so runs from before kind tags existed are
    # found by the study tag every variant run carries (a report run has none).
    flt = f"tags.study = '{expected.study}'"
    if expected.sweep_ids != ["legacy"]:
        flt = f"tags.kind = 'variant' and tags.sweep_id = '{expected.sweep_ids[0]}'"
    query = urllib.parse.urlencode({"searchFilter": flt, "orderByKey": "metrics.`ablation/peak_memory_gib`",
                                    "orderByAsc": "true"}, quote_via=urllib.parse.quote)
    ids = json.dumps(expected.ok or list(expected.runs))
    compare = urllib.parse.urlencode({"runs": ids, "experiments": json.dumps([expected.experiment_id])},
                                     quote_via=urllib.parse.quote)
    return {
        "runs_table": f"{base}/runs?{query}",
        "chart_view": f"{base}/runs?{query}&compareRunsMode=CHART",
        "compare_runs": f"http://127.0.0.1:{port}/#/compare-runs?{compare}",
    }


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
        self.profile = tempfile.TemporaryDirectory(prefix="ui-check-profile-")  # a fresh profile
        self.log = log_path.open("w")
        self.proc = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile.name}", "--remote-debugging-port=0",
             f"--window-size={WINDOW}", "about:blank"], stdout=self.log, stderr=subprocess.STDOUT)
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
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
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
        on pointer events); ("type", text) into the focused field; ("js", expression); ("wait", s).
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
            await self._call(ws, "Input.insertText", text=arg)
            await asyncio.sleep(0.8)
        elif kind == "js":
            await self._js(ws, arg)
            await asyncio.sleep(0.8)
        else:
            await asyncio.sleep(arg)

    async def _text(self, ws) -> str:
        result = await self._call(ws, "Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                                  returnByValue=True)
        return result.get("result", {}).get("value", "")

    async def _capture(self, pages: dict[str, tuple[str, list[str]]], out: Path, timeout_s: float) -> dict[str, list[str]]:
        import aiohttp

        missing: dict[str, list[str]] = {}
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{self.port}/json/list") as r:
                target = next(t for t in await r.json() if t["type"] == "page")
            async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                width, height = map(int, WINDOW.split(","))
                await self._call(ws, "Emulation.setDeviceMetricsOverride", width=width, height=height,
                                 deviceScaleFactor=1, mobile=False)
                for name, (url, expected) in pages.items():
                    await self._call(ws, "Page.navigate", url="about:blank")
                    await self._call(ws, "Page.navigate", url=url)
                    deadline = time.monotonic() + timeout_s
                    while True:
                        text = await self._text(ws)
                        absent = [e for e in expected if e not in text]
                        if not absent or time.monotonic() > deadline:
                            break
                        await asyncio.sleep(0.5)
                    for action in [*COMMON_ACTIONS, *ACTIONS.get(name, [])]:
                        await self._act(ws, action)
                    await asyncio.sleep(2.0)  # charts animate in after their data arrives
                    text = await self._text(ws)  # what the page shows now, as captured
                    absent = [e for e in expected if e not in text]
                    shot = await self._call(ws, "Page.captureScreenshot", format="png")
                    (out / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))
                    missing[name] = absent
        return missing

    def capture(self, pages: dict[str, tuple[str, list[str]]], out: Path, timeout_s: float = 90) -> dict[str, list[str]]:
        """{page name: (url, texts it must show)} -> {page name: the texts it did not show}; a
        screenshot of each page as <out>/<name>.png."""
        return asyncio.run(self._capture(pages, out, timeout_s))


def main(argv: Optional[list[str]] = None) -> int:
    from .config import TrackingConfig
    from .tracking import resolve_uri

    p = argparse.ArgumentParser(prog="python -m sdxl_ablate.ui_check", description=__doc__.split("\n")[0])
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
        port = free_port()
        server = start_server(uri, port, out / "mlflow-ui.log")
        problems += api_problems(expected, api_runs(port, expected.experiment_id))
        names = list(expected.runs.values())
        urls = ui_urls(port, expected)
        pages = {"runs_table": (urls["runs_table"], names),
                 "chart_view": (urls["chart_view"], ["ablation/peak_memory_gib"]),
                 # Its metrics table renders lazily: the headline metrics are checked in the API above.
                 "compare_runs": (urls["compare_runs"], [expected.runs[i] for i in expected.ok])}
        browser = Browser(binary, out / "chromium.log")
        try:
            missing = browser.capture(pages, out)
        finally:
            browser.close()
        for name, absent in missing.items():
            if absent:
                problems.append(f"the {name.replace('_', ' ')} page does not show {', '.join(absent)}")
            print(f"{name}: {pages[name][0]}\n  -> {out / f'{name}.png'}"
                  + (f" (missing: {', '.join(absent)})" if absent else ""))
    except UiCheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    if problems:
        print("ui-check FAILED:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 1
    print(f"ui-check ok: {len(expected.runs)} runs of sweep {', '.join(expected.sweep_ids)} with their headline "
          f"metrics, in the API and on the pages; screenshots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
