"""The rules of docs/CONTRACTS.md that code can check: which rooms import which, no import circles, and
small signatures."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("provq", "tokenizer", "generator", "eval")  # what the wheel installs
LIBRARIES = ("provq/data", "tokenizer", "generator")  # none of these imports another
BASE = ("provq/common",)  # imports no room of the project


def project_files() -> list[Path]:
    skip = {".venv", "tests", "runs", ".git", "build"}  # build/: setuptools' copies of the code, not the code
    return sorted(p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts))


def room_of(module: str) -> str | None:
    """The room a dotted module belongs to: provq's sub-packages are rooms of their own."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    return "/".join(parts[:2]) if parts[0] == "provq" and len(parts) > 1 else parts[0]


def imported_modules(path: Path) -> set[str]:
    """Every absolute module an import statement of ``path`` names (``from a import b`` names a.b too,
    since b may be a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative: resolve against the file's package
                package = module_of(path).split(".")
                package = package[: len(package) - node.level + (path.name == "__init__.py")]
                base = ".".join([*package, node.module])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def module_of(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("room", LIBRARIES + BASE)
def test_libraries_do_not_import_each_other(room):
    allowed = {"provq/common"} if room in LIBRARIES else set()
    for path in sorted((REPO / room).rglob("*.py")):
        rooms = {room_of(m) for m in imported_modules(path)} - {None}
        wrong = rooms - allowed - {room}
        assert not wrong, f"{path.relative_to(REPO)} imports {sorted(wrong)}"


def test_no_module_imports_one_that_imports_it_back():
    """No import circle between two modules (a package's __init__ re-exporting its own modules aside)."""
    files = {module_of(p): p for p in project_files() if room_of(module_of(p))}
    imports = {name: {m for m in imported_modules(path) if m in files} - {name} for name, path in files.items()}
    circles = sorted(f"{a} <-> {b}" for a, targets in imports.items() for b in targets
                     if a < b and a in imports.get(b, ()) and not (a.startswith(b + ".") or b.startswith(a + ".")))
    assert not circles, circles


def test_no_function_takes_more_than_six_parameters():
    too_many = []
    for path in project_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args
                names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
                count = len(names) + bool(args.vararg) + bool(args.kwarg) - (names[:1] in (["self"], ["cls"]))
                if count > 6:
                    too_many.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({count})")
    assert not too_many, too_many


def test_a_console_command_loads_neither_diffusers_nor_transformers_before_it_parses():
    """diffusers (which loads all its models and torch._dynamo) and transformers take seconds to import:
    a command's --help, and a typo in its flags, must not wait for them; building a model loads them."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    modules = sorted({target.split(":")[0] for target in scripts.values()})
    probe = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
             "print(sorted(m for m in ('diffusers', 'torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "['torch']"  # torch shows the probe sees an import when there is one
