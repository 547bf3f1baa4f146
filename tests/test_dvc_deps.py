"""dvc.yaml names exactly the code each stage runs, and no stage imports another.

A stage's code is the import closure of stages/<stage>.py over this repository's modules (module-
and function-level imports alike: both run). A module missing from a stage's deps means editing it
would not re-run the stage (stale results); a superfluous one means needless re-runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("textdiff", "stages")
STAGES = ("prepare", "pretrain", "extract", "train", "evaluate")


def module_file(name: str) -> Path | None:
    base = REPO / name.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {n for n in names if n.split(".")[0] in PACKAGES}


def import_closure(module: str) -> set[Path]:
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # importing a.b runs a/__init__
        todo.extend(imported_names(path))
    return {p.relative_to(REPO) for p in seen}


def declared_code(stage: str) -> tuple[set[Path], list[str]]:
    """The .py files a stage's deps cover, and the deps that are code (under the packages)."""
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["deps"]
    code = [d for d in deps if d.split("/")[0] in PACKAGES]
    files = set()
    for dep in code:
        path = REPO / dep
        files.update(p.relative_to(REPO) for p in ([path] if path.is_file() else path.rglob("*.py")))
    return files, code


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_are_exactly_its_import_closure(stage):
    closure = import_closure(f"stages.{stage}")
    files, code = declared_code(stage)
    missing = sorted(str(p) for p in closure - files)
    assert not missing, f"dvc.yaml stage {stage} runs code it does not depend on: {missing}"
    for dep in code:
        path = REPO / dep
        covered = {path.relative_to(REPO)} if path.is_file() else {p.relative_to(REPO) for p in path.rglob("*.py")}
        assert covered <= closure, f"dvc.yaml stage {stage} depends on {dep}, which it never imports"


def test_no_stage_imports_another_stage():
    for path in sorted((REPO / "stages").glob("*.py")):
        if path.name in ("__init__.py", "cli.py"):
            continue
        others = {n for n in imported_names(path) if n.startswith("stages")}
        assert not others, f"{path.name} imports {sorted(others)}: library code belongs in textdiff/"


def test_the_closure_reaches_indirect_modules():
    """The check can fail: modules reached only through other modules count, unrelated ones do not."""
    assert Path("textdiff/data/tiles.py") in import_closure("stages.extract")
    assert Path("textdiff/train/training.py") not in import_closure("stages.evaluate")


@pytest.mark.parametrize("stage", ("prepare", "pretrain", "extract"))
def test_the_teacher_half_never_runs_classifier_code(stage):
    """Editing the classifier must not make DVC re-run the teacher (the pipeline's point)."""
    closure = import_closure(f"stages.{stage}")
    model = sorted(str(p) for p in closure if p.parts[:2] in (("textdiff", "model"), ("textdiff", "train")))
    assert not model, f"stage {stage} imports {model}"


def test_stages_run_the_code_of_their_own_directory():
    """`python3 -m stages.cli` imports stages/ and textdiff/ from the stage's working directory (what
    its deps hash); the `textdiff` console script would import the editable install's, which for a
    queued experiment (run in a temporary copy) is the live workspace's code."""
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert stage["cmd"] == f"python3 -m stages.cli {name}", name
