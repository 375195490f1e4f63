"""The repository cites only what it contains: no notes outside it, no issue numbers."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Notes that live outside the repository, and issue-tracker references of this project.
OUTSIDE = re.compile(r"\.\./shared|\b(METHOD|DESIGN|STYLE)\.md\b|\bissues? #?\d+\b|\(issue \d+")


def test_no_file_refers_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in files:
        path = ROOT / name
        if path.suffix in (".png", ".jpg", ".tar") or not path.is_file() or name.endswith("test_self_contained.py"):
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{name}:{i}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders)
