"""Imports flow one way, and no module reaches itself through imports, lazy ones included.

Each room (top-level folder, installed as `draft_opd.<room>`) sits in a layer; a module may import its own
room and lower layers only:

    tools      perf, studies, faults              (scripts that drive whole jobs; never each other)
    launch     entry points, the job's run directory, rollout fleet, learner group
    roles      actors, learner, evaluation        (never each other)
    prompts    prompt sets and chat rendering     (training and evaluation both read them)
    speculative                                   (the shared core)
    buffer                                        (imports nothing of ours)

actors/ and learner/ reach the buffer through its public API (`from draft_opd.buffer import ...`) only.
Inside a room, imports between modules must form no cycle, so that each module reads on top of the ones
it imports. Run this file as a script (`python tests/test_layering.py`) to list every violation.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "draft_opd"
LAYERS = [
    ("buffer",),
    ("speculative",),
    ("prompts",),
    ("actors", "learner", "evaluation"),
    ("launch",),
    ("perf", "studies", "faults"),
]
ROOMS = tuple(room for layer in LAYERS for room in layer)


def layer_of(room: str) -> int:
    for i, rooms in enumerate(LAYERS):
        if room in rooms:
            return i
    raise AssertionError(f"{room} is in no layer: add it to LAYERS in {__file__}")


def our_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module without the namespace) of every import of ours in a file, at any depth (lazy ones count).

    `from draft_opd.launch import export` names the module `launch.export`; `from draft_opd.buffer import X`
    names the room `buffer` (its public API)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module.count(".") == 1:  # from draft_opd.<room> import <module or name>
                names = [
                    f"{node.module}.{a.name}"
                    if (ROOT / node.module.split(".")[1] / f"{a.name}.py").exists()
                    else node.module
                    for a in node.names
                ]
        else:
            continue
        found += [
            (node.lineno, name.split(".", 1)[1])
            for name in names
            if name.startswith(NAMESPACE + ".") and name.split(".")[1] in ROOMS
        ]
    return found


def modules() -> dict[str, Path]:
    return {f"{p.parent.name}.{p.stem}": p for room in ROOMS for p in sorted((ROOT / room).glob("*.py"))}


def layering_violations(module: str, path: Path) -> list[str]:
    room = module.split(".")[0]
    bad = []
    for line, imported in our_imports(path):
        other = imported.split(".")[0]
        if layer_of(other) > layer_of(room) or (layer_of(other) == layer_of(room) and other != room):
            bad.append(f"line {line}: {imported} ({'up' if layer_of(other) > layer_of(room) else 'sideways'})")
        if room in ("actors", "learner") and other == "buffer" and imported != "buffer":
            bad.append(f"line {line}: {imported} (use the buffer's public API: from draft_opd.buffer import ...)")
    return bad


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of `files` it imports; importing a room's `__init__` counts as importing it."""
    graph = {}
    for module, path in files.items():
        targets = set()
        for _, imported in our_imports(path):
            name = imported if imported in files else f"{imported}.__init__"
            if name in files and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


MODULES = modules()


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith(".__init__")))
def test_no_upward_or_sideways_import(module):
    bad = layering_violations(module, MODULES[module])
    assert not bad, f"{module}: " + "; ".join(bad)


def test_no_import_cycles():
    cycles = find_cycles(import_graph(MODULES))
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_an_upward_import_is_caught(tmp_path):
    """The check itself: a speculative module importing the launch layer, lazily, would fail."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from draft_opd.launch.config import Config\n")
    assert our_imports(probe) == [(2, "launch.config")]
    assert layering_violations("speculative.probe", probe) == ["line 2: launch.config (up)"]


def test_a_cycle_inside_a_room_is_caught(tmp_path):
    """The check itself: two modules of one room importing each other (one of them lazily) form a cycle."""
    (tmp_path / "a.py").write_text("from draft_opd.speculative.b import g\n")
    (tmp_path / "b.py").write_text("def g():\n    from draft_opd.speculative.a import f\n")
    (tmp_path / "c.py").write_text("from draft_opd.speculative.a import f\n")
    probes = {f"speculative.{name}": tmp_path / f"{name}.py" for name in "abc"}
    assert find_cycles(import_graph({**MODULES, **probes})) == [["speculative.a", "speculative.b"]]


if __name__ == "__main__":
    problems = [f"{m}: {v}" for m, p in MODULES.items() for v in layering_violations(m, p)]
    problems += ["cycle: " + " <-> ".join(c) for c in find_cycles(import_graph(MODULES))]
    print("\n".join(problems) or f"{len(MODULES)} modules: no upward or sideways import, no cycle")
    sys.exit(1 if problems else 0)
