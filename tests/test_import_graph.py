"""The house: jaxformer's import graph has no circle, and its arrows run down the layers.

Every module of ``jaxformer/`` is parsed (nothing is imported): each ``import`` and ``from ... import``,
at module level or inside a function, relative or absolute, is an arrow to the module it names;
``from jaxformer.x import y`` points at ``jaxformer.x.y`` when ``y`` is a module, else at
``jaxformer.x``. Importing ``jaxformer.x.y`` also runs the ``__init__`` of its parents, but those are
not arrows here: the package root only re-exports, and a sub-package's ``__init__`` is an arrow only
where a module names it (``from jaxformer.decoding import dynamic_decode``).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jaxformer"

# The areas of the package from the bottom up: an area may import its own modules and those of the
# layers below it, never those of its own layer or above. ``jaxformer/__init__.py`` (the curated
# public API) re-exports every layer and is exempt.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"typing"}),  # the dimension legend and array aliases
    frozenset({"data", "models"}),  # tokenizers, corpora, batching | the Flax modules and caches
    frozenset({"decoding"}),  # the search, the search-state protocol, one adapter per family
    frozenset({"training", "serving"}),  # losses, fit, sharding | the continuous-batching engine
    # Above training: load_pretrained places imported tensors on a mesh by training.sharding's
    # partition rules.
    frozenset({"interop"}),
    frozenset({"cli"}),  # the `jaxformer` command
)
EXEMPT = frozenset({"jaxformer"})


def package_modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> its file, for every module of the package (packages by their __init__)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module ``name`` imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]  # level 1: the package itself
                base = f"{parent}.{node.module}" if node.module else parent
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in modules else base)
    return {target for target in targets if target in modules and target != name}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    modules = package_modules(package)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            target = next(stack[-1], None)
            if target is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(target) == 1:
                return [*path[path.index(target) :], target]
            elif target not in state:
                state[target] = 1
                path.append(target)
                stack.append(iter(sorted(graph[target])))
    return None


def area(module: str) -> str:
    """``jaxformer.decoding.loop`` -> ``decoding``; ``jaxformer.typing`` -> ``typing``."""
    return module.split(".")[1]


def layer_of(module: str) -> int:
    for rank, areas in enumerate(LAYERS):
        if area(module) in areas:
            return rank
    raise AssertionError(f"{module}: its area {area(module)!r} is in no layer of LAYERS; place it")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every arrow from one area to another of the same or a higher layer."""
    return [
        f"{module} ({area(module)}) imports {target} ({area(target)})"
        for module, targets in sorted(graph.items())
        if module not in EXEMPT
        for target in sorted(targets)
        if area(target) != area(module) and layer_of(target) >= layer_of(module)
    ]


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_graph_is_read(graph):
    assert "jaxformer.decoding.loop" in graph["jaxformer.decoding"]
    assert "jaxformer.models.cache" in graph["jaxformer"]
    assert "jaxformer.training.sharding" in graph["jaxformer.interop.registry"]  # inside a function
    assert all(target in graph for targets in graph.values() for target in targets)


def test_every_kind_of_import_is_an_arrow(tmp_path):
    files = {
        "__init__.py": "from jaxformer.b import c\n",
        "a.py": "import os\nimport jaxformer.b.c\n",
        "b/__init__.py": "from . import c\nfrom .c import f\n",
        "b/c.py": "def f():\n    from ..a import g\n    from jaxformer import b\n",
        "b/d.py": "from jaxformer.b import f\nfrom .. import a\n",
    }
    for name, text in files.items():
        (tmp_path / "jaxformer" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "jaxformer" / name).write_text(text)
    assert import_graph(tmp_path / "jaxformer") == {
        "jaxformer": {"jaxformer.b.c"},
        "jaxformer.a": {"jaxformer.b.c"},
        "jaxformer.b": {"jaxformer.b.c"},
        "jaxformer.b.c": {"jaxformer.a", "jaxformer.b"},
        "jaxformer.b.d": {"jaxformer.b", "jaxformer.a"},
    }


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    if cycle:
        pytest.fail("import cycle: " + " -> ".join(cycle))


def test_imports_run_down_the_layers(graph):
    for module in graph:
        if module not in EXEMPT:
            layer_of(module)  # every area is placed
    wrong = upward_imports(graph)
    if wrong:
        pytest.fail("imports against the layers (see LAYERS):\n" + "\n".join(wrong))


def test_the_checks_can_fail():
    graph = {
        "jaxformer.models.a": {"jaxformer.decoding.b"},
        "jaxformer.decoding.b": {"jaxformer.models.a"},
    }
    assert find_cycle(graph) == [
        "jaxformer.decoding.b",
        "jaxformer.models.a",
        "jaxformer.decoding.b",
    ]
    assert upward_imports(graph) == [
        "jaxformer.models.a (models) imports jaxformer.decoding.b (decoding)"
    ]
    assert upward_imports(
        {"jaxformer.serving.a": {"jaxformer.training.b"}}
    )  # a peer is no layer below
