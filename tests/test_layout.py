"""The shape of the repository: a reading surface on top, the machinery in one package, imports in
one direction. Pins issue 45: train.py and credit.py imported each other, as did memory.py and
train.py, and evaluate.py -> credit.py -> train.py -> evaluate.py closed a third loop."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SURFACE = ("igsearch", "retriever", "step", "train", "evaluate", "warmup", "config", "prepare")
# each module imports only modules of a lower level: tools -> run -> step -> method -> package
LEVELS = {
    "machinery": 0,
    "igsearch": 1,
    "retriever": 1,
    "config": 2,
    "prepare": 3,
    "step": 3,
    "warmup": 4,
    "evaluate": 4,
    "train": 5,
    "tools": 6,
}


def project_files() -> dict[str, Path]:
    """Module name -> file, for the surface, the package and the tools."""
    files = {p.stem: p for p in ROOT.glob("*.py") if p.stem != "setup"}
    files |= {f"machinery.{p.stem}": p for p in (ROOT / "machinery").glob("*.py")}
    return files | {f"tools.{p.stem}": p for p in (ROOT / "tools").glob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def graph() -> dict[str, set[str]]:
    files = project_files()
    known = set(files) | {"machinery", "tools"}
    return {name: imports(path, known) - {name, "machinery"} for name, path in files.items()}


def level(name: str) -> int:
    return LEVELS[name.split(".")[0]]


def test_no_import_cycle():
    edges, state, stack = graph(), {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            assert state.get(nxt) != "open", "import cycle: " + " -> ".join(stack + [nxt])
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_imports_run_one_way_and_the_package_imports_no_surface():
    for name, targets in graph().items():
        for target in targets:
            package = name.split(".")[0]
            within = package in ("machinery", "tools") and target.split(".")[0] == package
            assert level(target) < level(name) or within, (
                f"{name} imports {target}: an import that runs back up"
            )


def test_the_surface_is_the_listed_modules_and_setup_installs_them():
    top = sorted(p.stem for p in ROOT.glob("*.py") if p.stem != "setup")
    assert top == sorted(SURFACE) and len(top) <= 9
    setup = (ROOT / "setup.py").read_text()
    listed = re.search(r"py_modules=\[(.*?)\]", setup, re.S).group(1)
    assert sorted(re.findall(r'"(\w+)"', listed)) == sorted(SURFACE)
    assert 'packages=["machinery"]' in setup
    first_party = (ROOT / "pyproject.toml").read_text().split("known-first-party = [")[1]
    names = re.findall(r'"(\w+)"', first_party.split("]")[0])
    assert sorted(names) == sorted([*SURFACE, "machinery", "tools"])
