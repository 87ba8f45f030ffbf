"""Every chapter runs top to bottom in the smoke profile, and its checked outputs are reproducible.

A chapter's closing cells `assert` its claims, so executing it tests it. See conftest.py for how
the executions are shared with the book build.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import SMOKE_CELL_TIMEOUT_S, SMOKE_DIR, SmokeRuns, run

pytestmark = pytest.mark.notebooks


def test_chapter_runs_in_smoke_profile(chapter: Path, smoke: SmokeRuns):
    result = smoke(chapter)
    if not result.ok:
        pytest.fail(
            f"{chapter.name} failed in the smoke profile (papermill; executed copy at "
            f"{SmokeRuns.output_path(chapter)}):\n{result.tail()}",
            pytrace=False,
        )
    executed = nbformat.read(SmokeRuns.output_path(chapter), as_version=4)
    code = [c for c in executed.cells if c.cell_type == "code" and c.source.strip()]
    assert code and all(c.execution_count for c in code), "papermill left cells unexecuted"
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and 'PROFILE = "smoke"' in injected[0].source, (
        "papermill did not inject PROFILE: the chapter needs a cell tagged 'parameters'"
    )


def test_checked_outputs_are_reproducible(chapter: Path, smoke: SmokeRuns):
    """nbval re-executes the smoke copy; cells marked `# NBVAL_CHECK_OUTPUT` must print the same."""
    if not smoke(chapter).ok:
        pytest.fail(f"{chapter.name} did not run in the smoke profile; see the test above")
    executed = SmokeRuns.output_path(chapter)
    checked = [
        c for c in nbformat.read(executed, as_version=4).cells
        if c.cell_type == "code" and c.source.lstrip().startswith("# NBVAL_CHECK_OUTPUT")
    ]
    assert checked, (
        f"{chapter.name} has no cell starting with `# NBVAL_CHECK_OUTPUT`: mark the cells whose "
        "printed output is deterministic (its check cells, at least) so that nbval compares them"
    )
    ini = SMOKE_DIR / "pytest.ini"  # keeps this repository's pytest settings and conftest out
    ini.write_text("[pytest]\n", encoding="utf-8")
    result = run([
        sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env",
        "--nbval-cell-timeout", str(SMOKE_CELL_TIMEOUT_S), "-p", "no:cacheprovider",
        "-c", str(ini), "--rootdir", str(SMOKE_DIR), "-q", "--color=no", str(executed),
    ], cwd=SMOKE_DIR)
    if not result.ok:
        pytest.fail(f"nbval on {executed} failed:\n{result.tail()}", pytrace=False)
    # nbval must have run the notebook's cells, not collected nothing.
    assert re.search(r"\b\d+ passed\b", result.log), result.tail()
