"""The layering docs/ARCHITECTURE.md describes, checked on the source: no import cycles (lazy and TYPE_CHECKING
imports included), a library that never imports its front ends, and model files that know nothing about devices."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "pixtral_mlx": ROOT / "pixtral_mlx",
    "pixtral_mlx.convert": ROOT / "convert",
    "pixtral_mlx.tui": ROOT / "tui",
}
BENCH = ("measure", "run", "patches", "experiments", "synthetic", "qmv")


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            parts = [p for p in f.relative_to(folder).with_suffix("").parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    for f in (ROOT / "benchmarks").glob("*.py"):
        out["benchmarks." + f.stem] = f
    return out


def imports(name: str, file: Path, known: dict[str, Path]) -> set[str]:
    """Every module of ours that `file` imports, at module level, inside functions or for type checking."""
    tree = ast.parse(file.read_text())
    package = name if file.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
                if name.startswith("benchmarks.") and module in BENCH:
                    module = "benchmarks." + module
            subs = {f"{module}.{a.name}" for a in node.names} & set(known)
            out |= subs or {module}
    return (out & set(known)) - {name}


def test_no_import_cycles():
    known = modules()
    graph = {m: imports(m, f, known) for m, f in known.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path[path.index(n) :] + [n])
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


FRONT_ENDS = ("pixtral_mlx.convert", "pixtral_mlx.tui")  # the top-level convert/ and tui/ folders


def test_the_library_never_imports_its_front_ends():
    known = modules()
    for name, file in known.items():
        if name.startswith(FRONT_ENDS) or not name.startswith("pixtral_mlx"):
            continue
        bad = {m for m in imports(name, file, known) if m.startswith(FRONT_ENDS)}
        assert not bad, (name, bad)


def test_models_import_nothing_of_the_runtime():
    known = modules()
    for name, file in known.items():
        if name.startswith("pixtral_mlx.models"):
            ours = imports(name, file, known)
            assert all(m.startswith("pixtral_mlx.models") or m == "pixtral_mlx.errors" for m in ours), (name, ours)


def test_model_files_know_nothing_about_devices():
    known = modules()
    names = [m for m in known if m.startswith("pixtral_mlx.models.") and m.rsplit(".", 1)[1] in ("model", "vision")]
    assert "pixtral_mlx.models.pixtral.model" in names and "pixtral_mlx.models.mistral3.model" in names
    for name in names:
        ours = imports(name, known[name], known)
        assert all(m.startswith("pixtral_mlx.models.") for m in ours), (name, ours)  # no backend, cpu, cpu_kernel
        text = known[name].read_text()
        assert "mx.cpu" not in text and "new_stream" not in text and "mx.stream(" not in text, name


@pytest.mark.parametrize("script", ["measure", "experiments", "qmv", "caption", "kv"])
def test_benchmarks_get_the_optimized_blas(script):
    """A benchmark that imports mlx before pixtral_mlx runs on MLX's bundled reference BLAS (about 50x
    slower GEMMs on Linux) and measures nothing we ship: each must import pixtral_mlx when it is imported,
    before its functions import mlx."""
    root = Path(__file__).resolve().parent.parent
    code = (
        f"import sys; sys.path.insert(0, {str(root / 'benchmarks')!r}); import {script}; "
        "import mlx.core; from pixtral_mlx import backend; print(backend.BLAS_NOTE)"  # mlx: as a job's first line
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "imported before pixtral_mlx" not in done.stdout
