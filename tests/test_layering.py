"""Imports flow one way. Each module sits in a layer; it may import its own package and lower layers only.

    tools      benchmarks.bench_*, .study_*, .text_eval, .fault_injection   (scripts that drive whole jobs)
    launch     entry points, the job's run directory, rollout fleet, learner group
    actors, learner                                              (never each other)
    benchmarks.datasets, .chat, .protocol                        (prompt sets: training reads them too)
    speculative                                                  (the shared core)
    buffer                                                       (imports nothing of ours)

actors/ and learner/ reach the buffer through its public API (`from buffer import ...`) only.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("buffer", "speculative", "benchmarks", "actors", "learner", "launch")
LAYERS = [
    ("buffer",),
    ("speculative",),
    ("benchmarks.datasets", "benchmarks.chat", "benchmarks.protocol"),
    ("actors", "learner"),
    ("launch",),
    ("benchmarks.bench_", "benchmarks.study_", "benchmarks.text_eval", "benchmarks.fault_injection"),
]


def layer_of(module: str) -> tuple[int, str]:
    """(layer, unit) of a module: the unit is the longest prefix of LAYERS that names it."""
    matches = [(len(prefix), i, prefix) for i, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix if prefix.endswith("_") else prefix + ".")]
    if not matches:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    _, layer, unit = max(matches)
    return layer, unit


def our_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of our packages in a file, at any depth (lazy imports count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        found += [(node.lineno, name) for name in names if name.split(".")[0] in PACKAGES]
    return found


MODULES = sorted(p for package in PACKAGES for p in (ROOT / package).glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_upward_or_sideways_import(path):
    module = f"{path.parent.name}.{path.stem}"
    layer, unit = layer_of(module)
    bad = []
    for line, imported in our_imports(path):
        other_layer, other_unit = layer_of(imported)
        same_package = imported.split(".")[0] == module.split(".")[0]
        if other_layer > layer or (other_layer == layer and not same_package):
            bad.append(f"line {line}: {imported} ({'up' if other_layer > layer else 'sideways'})")
        if unit in ("actors", "learner") and imported.startswith("buffer."):
            bad.append(f"line {line}: {imported} (use the buffer's public API: from buffer import ...)")
    assert not bad, f"{module}: " + "; ".join(bad)


def test_an_upward_import_is_caught(tmp_path):
    """The check itself: a speculative module importing the launch layer would fail."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from launch.config import Config\n")
    [(line, imported)] = our_imports(probe)
    assert (line, imported) == (2, "launch.config") and layer_of(imported)[0] > layer_of("speculative.probe")[0]
