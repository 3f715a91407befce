"""The package reads top-down: cli -> report -> eval / throughput / generate -> integrations ->
model -> caches -> ops (devices, results and data below all of them) -> integers (the number
arguments, which ops checks too). The model knows the cache protocol only: it imports no cache
implementation."""
import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "kcache_ops"
RANK = {"ops": 0, "reference": 0, "devices": 0, "results": 0, "data": 0, "integers": -1, "_C": 0,
        "caches": 1, "model": 2, "integrations": 2.5, "generate": 3, "eval": 3, "throughput": 3,
        "report": 4, "cli": 5, "__main__": 6}


def component(parts):
    """The top-level component (subpackage or module) of a module path inside kcache_ops."""
    return parts[0].removesuffix(".py")


def imported_components(path):
    """The kcache_ops components the module at ``path`` imports (relative or absolute)."""
    parts = path.relative_to(PACKAGE).parts
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb from the module's package
                base = list(parts[:-1])[:len(parts) - node.level]
                target = base + (node.module.split(".") if node.module else [])
                names = [a.name for a in node.names] if not target else []
                found |= {t for t in ([target[0]] if target else names)}
            elif node.module and node.module.startswith("kcache_ops."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names
                      if a.name.startswith("kcache_ops.")}
    return found


def test_imports_go_down_the_layers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if parts == ("__init__.py",):
            continue  # the package root loads _C and re-exports the ops
        own = component(parts)
        for other in imported_components(path):
            if other != own and RANK[other] >= RANK[own]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {other}")
    assert not wrong, "imports against the layers: " + "; ".join(wrong)


def test_model_imports_no_cache():
    """Importing the model loads no module of kcache_ops.caches (it knows the protocol only)."""
    code = ("import sys, kcache_ops.model; "
            "print(sorted(m for m in sys.modules if m.startswith('kcache_ops.caches')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", f"kcache_ops.model imported {out}"
