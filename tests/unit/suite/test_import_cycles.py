"""The scheduler package's modules import each other in one direction: no import cycles.

Rule: every `import` / `from ... import` anywhere in a module counts, including those inside
functions (a deferred import hides a cycle from Python at start-up but not from the reader), except
those under `if TYPE_CHECKING:` (they never run). An edge goes from a module to the deepest
scheduler module it names; `from scheduler.x import y` counts as an edge to scheduler.x.y when
that is a module, else to scheduler.x. A package's __init__ counts as the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import scheduler

PACKAGE_DIR = Path(scheduler.__file__).resolve().parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(tree: ast.AST, this: str, is_package: bool) -> list[str]:
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = this.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for a in node.names:
                names.append(f"{module}.{a.name}")
            names.append(module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the scheduler modules it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: set[str] = set()
        for imported in _imported_names(tree, name, path.name == "__init__.py"):
            if not imported.startswith("scheduler"):
                continue
            # the deepest prefix that is a module: `from scheduler.x import y` is x.y if y is a module
            parts = imported.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            target = ".".join(parts)
            if target and target != name and target != "scheduler":
                edges.add(target)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return components


def test_the_graph_sees_known_edges():
    graph = import_graph()
    assert "scheduler.config" in graph
    assert "scheduler.engines.base" in graph["scheduler.engines.factory"]
    # a function-level import is an edge too (the simulated engine's config check)
    assert "scheduler.devices.simulated" in graph["scheduler.config"]


def test_find_cycles_reports_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_scheduler_package_has_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles among scheduler modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)


#: the simulator's model layer, which the live simulated engine runs on
SIM_MODEL_LAYER = {"scheduler.sim.profiles", "scheduler.sim.physics", "scheduler.sim.core", "scheduler.sim.builders"}
#: the replay layer that drives it through a trace in virtual time
SIM_REPLAY_LAYER = {"scheduler.sim.fleet", "scheduler.sim.event_loop", "scheduler.sim.fleet_result", "scheduler.sim.hooks", "scheduler.sim.trace", "scheduler.sim.commands",
                    "scheduler.sim.prompts", "scheduler.sim.calibration", "scheduler.sim.fit"}


def test_simulator_model_layer_does_not_import_the_replay_layer():
    graph = import_graph()
    assert SIM_MODEL_LAYER | SIM_REPLAY_LAYER <= set(graph)
    wrong = {m: sorted(graph[m] & SIM_REPLAY_LAYER) for m in SIM_MODEL_LAYER if graph[m] & SIM_REPLAY_LAYER}
    assert not wrong, f"model-layer modules importing the replay layer: {wrong}"


def test_live_engines_do_not_import_the_replay_layer():
    graph = import_graph()
    engines = [m for m in graph if m.startswith("scheduler.engines.")]
    wrong = {m: sorted(graph[m] & SIM_REPLAY_LAYER) for m in engines if graph[m] & SIM_REPLAY_LAYER}
    assert not wrong, f"engines importing the simulator's replay layer: {wrong}"
