"""The package's import graph flows one way: core -> audio and prompts -> the speech stages in pipeline order
(with the model) -> the front-ends; text post-training beside them, on the core alone.

`python -m tests.test_layout` prints the graph (module: the desta modules it imports).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Speech stages in pipeline order (a module or a package): none may import a later one, nor a front-end.
PIPELINE = ["desta.describe", "desta.targets", "desta.train", "desta.evaluation", "desta.export"]
FRONT_ENDS = ["desta.serving", "desta.demo", "desta.cli"]
POSTTRAIN = "desta.posttrain"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: frozenset[str] = frozenset()) -> set[str]:
    """Every module a file imports, function-level imports included; `from a import b` counts a.b when that is
    one of `modules`, else a."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                imported.add(submodule if submodule in modules else node.module)
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
    return imported


def import_graph() -> dict[str, set[str]]:
    """Every desta module and the desta modules it imports."""
    modules = {module_name(path): path for path in sorted((ROOT / "desta").rglob("*.py"))}
    names = frozenset(modules)
    return {name: {m for m in imports_of(path, names) if m in modules} for name, path in modules.items()}


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def members(graph: dict[str, set[str]], prefix: str) -> set[str]:
    """The modules of a package (or the module itself), from the tree."""
    return {m for m in graph if within(m, prefix)}


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


def test_every_stage_and_front_end_is_in_the_tree(graph):
    assert [p for p in PIPELINE + FRONT_ENDS + [POSTTRAIN] if not members(graph, p)] == []


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_core_depends_on_nothing_outside_core(graph):
    outside = {m: sorted(i for i in imports if not within(i, "desta.core")) for m, imports in graph.items()
               if within(m, "desta.core")}
    assert {m: i for m, i in outside.items() if i} == {}


def test_text_post_training_uses_the_core_not_the_speech_side(graph):
    speech = {m for m in graph if not within(m, "desta.core") and not within(m, POSTTRAIN) and m != "desta"}
    posttrain = {m: sorted(graph[m] & speech) for m in members(graph, POSTTRAIN)}
    assert {m: i for m, i in posttrain.items() if i} == {}


def test_the_speech_side_never_imports_text_post_training(graph):
    speech = {m: sorted(i for i in imports if within(i, POSTTRAIN)) for m, imports in graph.items()
              if not within(m, POSTTRAIN) and m != "desta.cli"}  # the command line lists every command
    assert {m: i for m, i in speech.items() if i} == {}


@pytest.mark.parametrize("index", range(len(PIPELINE)))
def test_stages_never_import_a_later_stage_or_a_front_end(graph, index):
    later = set().union(*(members(graph, p) for p in PIPELINE[index + 1:] + FRONT_ENDS))
    stage = members(graph, PIPELINE[index])
    assert {m: sorted(graph[m] & later) for m in stage if graph[m] & later} == {}


def test_no_module_is_over_600_lines():
    assert {str(p.relative_to(ROOT)): n for p in (ROOT / "desta").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600} == {}


def test_no_function_is_over_60_lines():
    long = {f"{p.relative_to(ROOT)}:{node.name}": length for p in (ROOT / "desta").rglob("*.py")
            for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and (length := node.end_lineno - node.lineno + 1) > 60}
    assert long == {}


def test_production_code_never_imports_the_tests():
    assert [p.name for p in (ROOT / "desta").rglob("*.py")
            if any(m == "tests" or m.startswith(("tests.", "pytest")) for m in imports_of(p))] == []


if __name__ == "__main__":
    for module, imports in import_graph().items():
        print(f"{module}: {', '.join(sorted(imports)) or '-'}")
