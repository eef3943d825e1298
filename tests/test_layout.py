"""The package's import graph flows one way: core -> audio and text pieces -> stages in pipeline order.

`python -m tests.test_layout` prints the graph (module: the desta modules it imports).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Speech stages in pipeline order: none may import a later one.
PIPELINE = ["desta.describe", "desta.targets", "desta.train", "desta.evaluate", "desta.export"]
SPEECH = {"desta.audio", "desta.attributes", "desta.asr", "desta.describe", "desta.targets", "desta.modeling",
          "desta.processing", "desta.loading", "desta.features", "desta.data", "desta.train", "desta.scoring",
          "desta.evaluate", "desta.export", "desta.inference", "desta.chat", "desta.serve", "desta.synth",
          "desta.tts", "desta.demo", "desta.app", "desta.benchmarks"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, function-level imports included."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
    return imported


def import_graph() -> dict[str, set[str]]:
    """Every desta module and the desta modules it imports."""
    return {module_name(path): {m for m in imports_of(path) if m.startswith("desta.")}
            for path in sorted((ROOT / "desta").rglob("*.py"))}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_core_depends_on_nothing_outside_core(graph):
    outside = {m: sorted(i for i in imports if not i.startswith("desta.core")) for m, imports in graph.items()
               if m.startswith("desta.core")}
    assert {m: i for m, i in outside.items() if i} == {}


def test_text_post_training_uses_the_core_not_the_speech_stages(graph):
    posttrain = {m: sorted(i & SPEECH) for m, i in graph.items() if m.startswith("desta.posttrain")}
    assert {m: i for m, i in posttrain.items() if i} == {}


@pytest.mark.parametrize("index", range(len(PIPELINE)))
def test_stages_never_import_a_later_stage(graph, index):
    later = set(PIPELINE[index + 1:]) | {"desta.serve", "desta.chat", "desta.demo", "desta.cli"}
    assert sorted(graph[PIPELINE[index]] & later) == []


def test_production_code_never_imports_the_tests():
    assert [p.name for p in (ROOT / "desta").rglob("*.py")
            if any(m == "tests" or m.startswith(("tests.", "pytest")) for m in imports_of(p))] == []


if __name__ == "__main__":
    for module, imports in import_graph().items():
        print(f"{module}: {', '.join(sorted(imports)) or '-'}")
