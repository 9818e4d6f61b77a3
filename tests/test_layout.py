"""The package is a map of the pipeline: each stage imports only from the stages before it,
and no module imports itself back through another (issue 16).

Imports are read from the source (inside functions too: a lazy import is still a dependency).
Entry points (`sdxl_ablate/__main__.py`, the thin top-level CLI modules and each package's
`__main__.py`) stand above every stage and may import any of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sdxl_ablate"

# Lowest first: config and the tracker are used everywhere; the study runner drives every stage
# below it; the report reads what runs recorded; perf (plan, bench) measures all of it.
STAGES = ["config", "track", "data", "model", "train", "evaluate", "export", "run", "report", "perf"]


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; use sdxl_ablate.<stage>.<module>")
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sdxl_ablate"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("sdxl_ablate")}
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) & set(known) for name, path in known.items()}


def is_entry_point(module: str) -> bool:
    parts = module.split(".")
    return len(parts) <= 2 and parts[-1] not in STAGES or parts[-1] == "__main__"


def test_every_module_belongs_to_a_stage_or_is_an_entry_point():
    strays = [m for m in modules() if m != "sdxl_ablate" and not is_entry_point(m) and m.split(".")[1] not in STAGES]
    assert not strays, f"modules outside the pipeline's stages: {strays}"


def test_each_stage_imports_only_from_the_stages_before_it():
    rank = {stage: i for i, stage in enumerate(STAGES)}
    upward = []
    for module, targets in graph().items():
        if module == "sdxl_ablate" or is_entry_point(module):
            continue
        own = module.split(".")[1]
        for target in targets:
            stage = target.split(".")[1]
            if rank[stage] > rank[own]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against the pipeline's order:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """The checks above can fail: a fake package with config -> run and a <-> b is caught."""
    pkg = tmp_path / "sdxl_ablate"
    for rel, text in {"config/__init__.py": "", "config/schema.py": "from sdxl_ablate.run.a import x\n",
                      "run/__init__.py": "", "run/a.py": "from sdxl_ablate.run.b import y\nx = 1\n",
                      "run/b.py": "def f():\n    from sdxl_ablate.run.a import x\ny = 2\n"}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", pkg)
    import pytest

    with pytest.raises(AssertionError, match="sdxl_ablate.config.schema -> sdxl_ablate.run.a"):
        test_each_stage_imports_only_from_the_stages_before_it()
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycles()



def test_every_mlflow_client_is_made_by_tracker_connect():
    """MlflowClient creates and migrates a fresh sqlite store on construction; only
    `track.tracker.connect` does it under the store's lock (issue 18: concurrent starts)."""
    made, in_connect = [], []
    for module, path in modules().items():
        tree = ast.parse(path.read_text())
        connect = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "connect"
                   and module == "sdxl_ablate.track.tracker"]
        for node in ast.walk(tree):
            func = getattr(node, "func", None) if isinstance(node, ast.Call) else None
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name != "MlflowClient":
                continue
            inside = any(c.lineno <= node.lineno <= c.end_lineno for c in connect)
            (in_connect if inside else made).append(f"{module}:{node.lineno}")
    assert len(in_connect) == 1, "track.tracker.connect must make the client itself"
    assert not made, f"MlflowClient made outside track.tracker.connect: {made}"
