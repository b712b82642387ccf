"""The package's shape: imports run one way, from the CLI down to the stages, never back.

Every module under ``src/busi`` is parsed (no import is executed), and each
``import busi...`` / ``from busi... import ...`` -- at the top or inside a function --
is an edge. A cycle between modules, or an edge from a lower layer up into a higher one,
fails with the modules named, so the layout in ``busi/__init__.py`` stays true.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "busi"

# The pipeline, top to bottom: a module may import its own layer and the layers above it
# in this list (lower numbers), never a later one. Keys are modules or package prefixes.
LAYERS = {
    "busi.errors": 0, "busi.config": 0, "busi.runtime": 0, "busi.runs": 0,
    "busi.data": 1,
    "busi.models": 2,
    "busi.evaluation": 3,
    "busi.reporting": 4,
    "busi.training": 5,
    "busi.inference": 6,
    "busi.workflows": 7,
    "busi.cli": 8, "busi": 8,  # busi/__init__.py: the notebook API over everything
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    """The layer of the longest LAYERS key that is ``module`` or a package above it."""
    best = None
    for key in LAYERS:
        covers = module == key or (key != "busi" and module.startswith(key + "."))
        if covers and (best is None or len(key) > len(best)):
            best = key
    return None if best is None else LAYERS[best]


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the busi modules it imports (resolved to modules that exist under ``root``)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}

    def resolve(name: str) -> str | None:
        while name and name not in files:  # `from busi.x import y`: y may be a function
            name = name.rpartition(".")[0]
        return name or None

    for mod, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t == "busi" or t.startswith("busi."):
                    dep = resolve(t)
                    if dep and dep != mod and dep != "busi":  # busi/__init__ runs for all
                        graph[mod].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Edges from a module into a later layer, and modules no layer covers."""
    bad = [f"{m} is in no layer of LAYERS" for m in graph if layer_of(m) is None]
    for mod, deps in sorted(graph.items()):
        for dep in sorted(deps):
            lm, ld = layer_of(mod), layer_of(dep)
            if lm is not None and ld is not None and ld > lm:
                bad.append(f"{mod} (layer {lm}) imports {dep} (layer {ld})")
    return bad


def layout_problems(root: Path) -> list[str]:
    graph = import_graph(root)
    return ([f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
            + upward_imports(graph))


def test_imports_run_one_way_without_cycles() -> None:
    problems = layout_problems(SRC)
    assert not problems, "\n".join(problems)


def test_the_check_sees_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    """The flat layout before issue 12 in miniature: train <-> evaluate, and data (layer 1)
    reaching up into training (layer 5) inside a function."""
    root = tmp_path / "busi"
    (root / "data").mkdir(parents=True)
    (root / "training").mkdir()
    (root / "__init__.py").write_text("")
    (root / "data" / "__init__.py").write_text("")
    (root / "data" / "loading.py").write_text(
        "def f():\n    from busi.training.loop import fit\n")
    (root / "training" / "__init__.py").write_text("")
    (root / "training" / "loop.py").write_text("from busi.data import loading\n")
    (root / "train.py").write_text("def g():\n    from busi.evaluate import run\n")
    (root / "evaluate.py").write_text("import busi.train\n")
    problems = layout_problems(root)
    assert "import cycle: busi.evaluate <-> busi.train" in problems
    assert "import cycle: busi.data.loading <-> busi.training.loop" in problems
    assert "busi.data.loading (layer 1) imports busi.training.loop (layer 5)" in problems
    assert "busi.train is in no layer of LAYERS" in problems


@pytest.mark.parametrize("module", ["busi.models.masks", "busi.evaluation.classification",
                                    "busi.reporting.report"])
def test_layer_of_a_module_is_its_package(module: str) -> None:
    assert layer_of(module) == LAYERS[module.rsplit(".", 1)[0]]


def test_the_first_backend_import_is_the_quiet_one() -> None:
    """Any stage module may be the first to pull in Keras (the restructure made
    busi.data.batches one): TensorFlow's C++ start-up lines must still not reach the user."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import busi.data.batches, busi.models"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "absl" not in proc.stderr and "oneDNN" not in proc.stderr, proc.stderr[-2000:]


# Each command's workflow in a module of its own (one 769-line module held them all):
# command -> (module under busi.workflows, the function the CLI calls).
WORKFLOWS = {"cv": ("cv", "run_cv"), "evaluate": ("evaluate", "evaluate_command"),
             "evaluate --data": ("sites", "evaluate_on_data"), "rerun": ("rerun", "rerun"),
             "demo": ("demo", "run_demo")}


@pytest.mark.parametrize("command", sorted(WORKFLOWS))
def test_each_command_workflow_lives_in_its_own_module(command: str) -> None:
    module, function = WORKFLOWS[command]
    path = SRC / "workflows" / f"{module}.py"
    assert path.is_file(), f"busi {command}: no module {path}"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert function in defined, f"{function} is not defined in {path.name}"
    others = {f for m, f in WORKFLOWS.values() if m != module}
    assert not defined & others, f"{path.name} also holds {sorted(defined & others)}"
    cli = (SRC / "cli.py").read_text(encoding="utf-8")
    assert f"from busi.workflows.{module} import" in cli
