"""The README's commands, run as a reader types them (the course's are in test_course.py, the
training command's in test_distributed.py).

`make bench` is run in its quick mode: this checks that the command works and writes what the
README says it writes, never how fast anything is (timings are not tests).
"""

from __future__ import annotations

import json
import re

import pytest

from conftest import ROOT
from test_course import make


def test_make_bench_quick_writes_the_tables_and_diagrams(tmp_path):
    result = make("bench", "QUICK=1", f"BENCH_OUT={tmp_path}", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("speed.json", "speed.md", "work_precision.json", "work_precision.md",
                 "work_precision_nfe.png", "work_precision_time.png"):
        assert (tmp_path / name).stat().st_size > 0, f"make bench wrote no {name}"
    speed = json.loads((tmp_path / "speed.json").read_text())
    assert len(speed["rows"]) == 3 and all(r["neuralode_nfe"] > 0 for r in speed["rows"])
    assert f"Results: {tmp_path}/" in result.stdout


def test_every_make_target_the_readme_names_exists_and_make_help_lists_it():
    named = set(re.findall(r"\bmake ([\w-]*\w)", (ROOT / "README.md").read_text(encoding="utf-8")))
    assert {"book", "test", "bench", "student", "grade", "clean"} <= named, named
    listed = set(re.findall(r"^make ([\w-]*\w)", make("help").stdout, re.M))
    for target in sorted(named):
        assert target in listed, f"README.md names `make {target}`, which `make help` does not list"
        dry = make("-n", target, "SUBMISSIONS=x")
        assert dry.returncode == 0, f"make -n {target}: {dry.stderr}"
