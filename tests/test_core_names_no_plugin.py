"""The core names no plugin: no string literal under benchmark/medssl_bench equals the name
of a built-in plugin or is compared with one. Plugins declare what they are (the baseline
role, defaults, metric directions, data locations, result-neutral settings, figures) and the
core asks. Help texts and messages may mention plugins as examples (they are longer strings
that merely contain a name); exact literals are what branching on a name needs."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "benchmark" / "medssl_bench"

#: Exact literals that stay, each with the reason. Reading records written by 0.1 (before
#: records said what they are) needs 0.1's names; run keys must keep 0.1's hash fields.
ALLOWED = {
    ("plan.py", "scratch"): "the hash field 0.1 used in keys of runs without pretraining",
    ("store.py", "transfer"): "reading 0.1 records: 0.1 named the corpus in every transfer label",
    ("store.py", "convergence"): "reading 0.1 records: 0.1 drew convergence curves for that "
                                 "protocol's results",
    ("interfaces.py", "convergence"): "the name of a figure (metric per epoch), not a protocol",
    ("probe.py", "knn"): "the name of a probe (cosine k-NN on features), not the protocol",
}


def _literals(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr)}
    return [(node.value, node.lineno) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings]


def test_no_core_module_names_a_plugin(registry):
    names = {name for kind in ("task", "backbone", "dataset", "protocol")
             for name in registry.names(kind)}
    found = []
    for path in sorted(CORE.rglob("*.py")):
        for value, line in _literals(path):
            if value in names and (path.name, value) not in ALLOWED:
                found.append(f"{path.relative_to(CORE)}:{line}: {value!r}")
    assert not found, "the core names plugins:\n" + "\n".join(found)


def test_allowed_exceptions_are_still_needed():
    for (file, value), reason in ALLOWED.items():
        assert any(v == value for v, _ in _literals(CORE / file)), (
            f"{file} no longer holds {value!r} ({reason}): remove it from ALLOWED")
