"""The rules of docs/CONTRACTS.md that code can check: which rooms import which, and small signatures."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = ("data", "tokenizer", "generator")  # none of these imports another
BASE = ("common",)  # imports no room of the project


def project_files() -> list[Path]:
    skip = {".venv", "tests", "runs", ".git"}
    return sorted(p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts))


def imported_rooms(path: Path) -> set[str]:
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            rooms.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            rooms.add(node.module.split(".")[0])
    return rooms


@pytest.mark.parametrize("room", LIBRARIES + BASE)
def test_libraries_do_not_import_each_other(room):
    project_rooms = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    allowed = {"common"} if room in LIBRARIES else set()
    for path in sorted((REPO / room).rglob("*.py")):
        wrong = (imported_rooms(path) & project_rooms) - allowed - {room}
        assert not wrong, f"{path.relative_to(REPO)} imports {sorted(wrong)}"


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
