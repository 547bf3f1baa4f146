"""Rewrite each stage's code deps in dvc.yaml as the stage's exact import closure.

The closure is the one tests/test_dvc_deps.py checks (module- and function-level imports of
stages/<stage>.py over textdiff/ and stages/). Comments and non-code deps are left as they are;
the code deps of a stage are replaced, sorted, where the first of them stood. Run from the repo
root after adding, moving or re-importing a module: `python3 tools/regen_dvc_deps.py`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_dvc_deps import PACKAGES, STAGES, import_closure  # noqa: E402


def code_deps(stage: str) -> list[str]:
    """The closure as deps: a sub-package every module of which the stage imports is named as its
    folder (a new module there is then a dep without editing dvc.yaml), the rest file by file."""
    closure = import_closure(f"stages.{stage}")
    deps = set()
    for path in closure:
        folder = REPO / path.parent
        whole = len(path.parts) > 2 and {p.relative_to(REPO) for p in folder.rglob("*.py")} <= closure
        deps.add(str(path.parent) if whole else str(path))
    return sorted(deps)


def main() -> int:
    lines = (REPO / "dvc.yaml").read_text().splitlines(keepends=True)
    out, stage, in_deps, placed = [], None, False, False
    for line in lines:
        header = re.match(r"^  ([A-Za-z_]+):\s*$", line)
        if header:
            stage, in_deps, placed = header.group(1), False, False
        if re.match(r"^    deps:\s*$", line):
            in_deps = True
            out.append(line)
            continue
        if in_deps and re.match(r"^    \S", line):
            in_deps = False
        dep = re.match(r"^      - (\S+)\s*$", line)
        if in_deps and stage in STAGES and dep and dep.group(1).split("/")[0] in PACKAGES:
            if not placed:
                out.extend(f"      - {p}\n" for p in code_deps(stage))
                placed = True
            continue
        out.append(line)
    (REPO / "dvc.yaml").write_text("".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
