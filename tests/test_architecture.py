"""The house drawn from its imports (docs/architecture.md): no import circle among the package's
modules, and the flow one way -- cli -> methods -> processors -> ops -> plan / reference -- with no
import running back up. Imports inside functions count: a lazy import still ties two modules."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# a module of the first group may not import one of the second (higher floors)
LAYERS = [
    ("longvideo.methods", ("longvideo.cli",)),
    ("longvideo.processors", ("longvideo.cli", "longvideo.methods")),
    ("longvideo.ops", ("longvideo.cli", "longvideo.methods", "longvideo.processors", "longvideo.planner")),
    ("longvideo.reference", ("longvideo.cli", "longvideo.methods", "longvideo.processors", "longvideo.ops")),
    ("longvideo.models", ("longvideo.cli", "longvideo.methods", "longvideo.processors")),
]


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def file_imports(path: Path, root: Path = ROOT) -> set:
    """Every module name a file imports, at any level (functions included), as absolute names
    (``from .x import y`` gives both ``pkg.x`` and ``pkg.x.y``)."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def import_graph(root: Path = ROOT) -> dict:
    """module -> the package's modules it imports, for every module of root/longvideo."""
    files = {_module_name(p, root): p for p in (root / "longvideo").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for target in file_imports(path, root):
            while target and target not in files:  # a name inside a module -> that module
                target = target.rsplit(".", 1)[0] if "." in target else ""
            # a module reaching its own package's __init__ (a relative `from . import x`) is no tie
            if target and target != name and not name.startswith(target + "."):
                targets.add(target)
        graph[name] = targets
    return graph


def circles(graph: dict) -> list:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_the_detector_finds_a_circle_and_a_lazy_import(tmp_path):
    pkg = tmp_path / "longvideo"
    (pkg / "fam").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "fifo.py").write_text("from .fam import family_for\n")
    (pkg / "fam" / "__init__.py").write_text("from .wan22 import W\n")
    (pkg / "fam" / "wan22.py").write_text("def f():\n    from ..fifo import model_fingerprint\n")
    assert circles(import_graph(tmp_path)) == [["longvideo.fam", "longvideo.fam.wan22", "longvideo.fifo"]]


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_the_flow_is_one_way():
    graph = import_graph()
    assert "longvideo.methods.fifo" in graph and "longvideo.ops" in graph  # the graph was read
    bad = [(m, t) for m, targets in graph.items() for low, high in LAYERS if m == low or m.startswith(low + ".")
           for t in targets if any(t == h or t.startswith(h + ".") for h in high)]
    assert bad == [], bad
