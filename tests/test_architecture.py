"""The package's shape, drawn from its source: layers as folders that import only downward, no
import circle, no import hidden inside a function, modules short enough to read in one sitting, and
DeepSpeed named only behind the engine interface."""
import ast
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Bottom to top; a module may import from its own layer and the ones below.
LAYERS = ("kernels", "base", "core", "models", "engine", "commands", "demo")
# Above every layer: the entry points, and the objectives' public API (users import it as
# fastdadpo.objectives; it names what fastdadpo.core holds).
TOP = ("fastdadpo", "fastdadpo.cli", "fastdadpo.__main__", "fastdadpo.objectives")
MAX_LINES = 500  # outside the kernels
# The kernels import their Triton modules when a Triton kernel first runs: the other backends (and a
# machine without Triton) never import Triton. Not a hidden circle: these modules import none of theirs.
LAZY_TRITON = ("fastdadpo.kernels.triton_rows", "fastdadpo.kernels.tl_utils", "fastdadpo.kernels.triton_backend")
DEEPSPEED_HOME = "fastdadpo.engine.deepspeed"
# Who may reach into the DeepSpeed engine: the registry of engines, and the config whose
# ``deepspeed:`` section builds it.
DEEPSPEED_CALLERS = ("fastdadpo.engine.registry", "fastdadpo.commands.config")


def _modules() -> dict:
    modules = {}
    for path in (ROOT / "fastdadpo").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    for path in (ROOT / "kernels" / "src").glob("*.py"):
        modules["fastdadpo.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return modules


def _resolve(name: str, modules: dict):
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(name: str, path: pathlib.Path, modules: dict):
    """(imported module, line, inside a function) for every import of a fastdadpo module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    in_function = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            if target.split(".")[0] != "fastdadpo":
                continue
            resolved = _resolve(target, modules)
            if resolved and resolved != name:
                yield resolved, node.lineno, id(node) in in_function


def _layer(name: str) -> int:
    if name in TOP:
        return len(LAYERS)
    return LAYERS.index(name.split(".")[1])


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return modules, {name: list(_imports(name, path, modules)) for name, path in modules.items()}


def test_every_module_is_in_a_layer(graph):
    modules, _ = graph
    stray = [name for name in modules if name not in TOP and name.split(".")[1] not in LAYERS]
    assert not stray, f"modules outside the layer folders: {stray}"


def test_imports_only_go_down(graph):
    _, edges = graph
    upward = [f"{name} line {line} imports {target}" for name, targets in edges.items() for target, line, _ in targets
              if _layer(target) > _layer(name) and name not in TOP]
    assert not upward, "\n".join(upward)


def test_no_import_circle(graph):
    _, edges = graph
    state, circles = {}, []

    def visit(name, trail):
        state[name] = "open"
        for target, _, _ in edges.get(name, ()):
            if state.get(target) == "open":
                circles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[name] = "done"

    for name in edges:
        if name not in state:
            visit(name, [name])
    assert not circles, circles


def test_no_import_hidden_in_a_function(graph):
    _, edges = graph
    hidden = [f"{name} line {line} imports {target}" for name, targets in edges.items() for target, line, inside in targets
              if inside and target not in LAZY_TRITON]
    assert not hidden, "\n".join(hidden)


def test_modules_read_in_one_sitting(graph):
    modules, _ = graph
    long = {name: sum(1 for _ in open(path, encoding="utf-8")) for name, path in modules.items()
            if not name.startswith("fastdadpo.kernels")}
    assert not {name: lines for name, lines in long.items() if lines > MAX_LINES}


def test_deepspeed_stays_behind_the_engine_interface(graph):
    modules, edges = graph
    callers = sorted({name for name, targets in edges.items() for target, _, _ in targets
                      if target.startswith(DEEPSPEED_HOME) and not name.startswith(DEEPSPEED_HOME)})
    assert set(callers) <= set(DEEPSPEED_CALLERS), callers
    importers = []
    for name, path in modules.items():
        if name.startswith(DEEPSPEED_HOME):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            named = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            importers += [f"{name} line {node.lineno}" for module in named if module.split(".")[0] == "deepspeed"]
    assert not importers, importers
    trainer = (ROOT / "fastdadpo" / "commands" / "train.py").read_text(encoding="utf-8")
    assert "deepspeed" not in trainer.replace("``deepspeed`` launcher", "").lower()


def test_the_graph_sees_a_planted_violation(tmp_path, monkeypatch):
    """The checks above can fail: an upward import planted in a copy of a core module is found."""
    modules = _modules()
    planted = tmp_path / "planted.py"
    planted.write_text("from fastdadpo.commands import train\n\ndef f():\n    from fastdadpo.core import rows\n")
    found = list(_imports("fastdadpo.core.planted", planted, {**modules, "fastdadpo.core.planted": planted}))
    assert ("fastdadpo.commands.train", 1, False) in found and ("fastdadpo.core.rows", 4, True) in found
    assert _layer("fastdadpo.commands.train") > _layer("fastdadpo.core.planted")


def test_entry_points_exist():
    assert os.path.exists(ROOT / "fastdadpo" / "cli.py") and os.path.exists(ROOT / "fastdadpo" / "__main__.py")


def test_objectives_public_api_names_the_core():
    import fastdadpo.objectives as api
    from fastdadpo.core import losses, objectives, step

    assert api.dpo_loss is losses.dpo_loss and api.dadpo_loss is losses.dadpo_loss
    assert api.register_objective is objectives.register_objective and api.Needs is step.Needs
    assert all(hasattr(api, name) for name in api.__all__)
