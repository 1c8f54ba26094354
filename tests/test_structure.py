"""The architecture as a test: which package may import which, no import cycles, and ingest without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hico", "protos", "memory", "ingest", "encoder_svc", "reasoner", "vcflash")
# Who may import whom (besides itself). `vcflash.serve` is the platform at the bottom; `vcflash` above it is the
# application (CLI, all-in-one, client) and may import everything.
ALLOWED = {
    "vcflash.serve": set(),
    "hico": set(),
    "protos": {"vcflash.serve"},
    "memory": {"vcflash.serve", "protos"},
    "ingest": {"vcflash.serve", "protos", "memory", "hico.pixels"},
    "encoder_svc": {"vcflash.serve", "protos", "memory", "hico"},
    "reasoner": {"vcflash.serve", "protos", "memory", "hico"},
}


def layer(module: str) -> str:
    return "vcflash.serve" if module.startswith("vcflash.serve") else module.split(".")[0]


def imports(path: Path) -> set[str]:
    """Every project module named by an import anywhere in the file (inside functions too), but for imports
    that only type checkers see."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        out |= {n for n in names if n.split(".")[0] in PACKAGES}
    return out


def sources() -> list[tuple[str, Path]]:
    out = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "_pb2" not in path.name:
                out.append((".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"), path))
    return out


def test_no_import_runs_up_the_layers() -> None:
    wrong = []
    for module, path in sources():
        own = layer(module)
        if own not in ALLOWED:
            continue  # the application layer
        for target in imports(path):
            other = layer(target)
            allowed = ALLOWED[own]
            ok = other == own or other in allowed or any(target.startswith(a) for a in allowed if "." in a)
            if not ok:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    modules = dict(sources())
    graph = {m: {t for t in imports(p) if t in modules and t != m} for m, p in modules.items()}
    # a module named `pkg.mod.Name` resolves to `pkg.mod`; keep only real modules
    seen: dict[str, int] = {}  # 1 visiting, 2 done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        seen[m] = 1
        for t in graph[m]:
            if seen.get(t) == 1:
                cycles.append(" -> ".join([*path[path.index(t) :], t]))
            elif t not in seen:
                visit(t, [*path, t])
        seen[m] = 2

    for m in graph:
        if m not in seen:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("module", ["ingest.server", "ingest", "vcflash.cli", "vcflash.console.split"])
def test_ingest_and_the_cli_start_without_torch(module: str) -> None:
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
