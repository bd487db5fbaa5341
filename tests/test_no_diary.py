"""The product speaks of itself only: no file tells how its work was organised (numbered work periods, issue
numbers, borrowed machines), only what the product does and measures."""

from __future__ import annotations

import re
import subprocess

from _helpers import REPO

FORBIDDEN = re.compile(
    r"from the issue|\bissues? #?\d+|\bsession \d+|\bgpu_session|\blent\b|\bborrowed (?:gpu|machine)"
    r"|\bwork periods?\b|\bsprint\b",
    re.IGNORECASE,
)
TEXT = (".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt", ".cfg", ".json", ".jsonl")


def test_no_file_speaks_of_how_the_work_was_organised() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for name in files:
        if not name.endswith(TEXT) or name == "tests/test_no_diary.py":
            continue
        path = REPO / name
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits[:20])
