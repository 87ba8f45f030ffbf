"""Every chapter runs top to bottom in the smoke profile, and its checked outputs are reproducible.

A chapter's closing cells `assert` its claims, so executing it tests it. See conftest.py for how
the executions are shared with the book build.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from conftest import SmokeRuns

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


def _checked_outputs(path: Path) -> list[tuple[str, str]]:
    """The text outputs of the cells marked ``# NBVAL_CHECK_OUTPUT``: (first source line, text)."""
    cells = [c for c in nbformat.read(path, as_version=4).cells
             if c.cell_type == "code" and c.source.lstrip().startswith("# NBVAL_CHECK_OUTPUT")]
    found = []
    for cell in cells:
        texts = []
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                texts.append(out.text)
            elif out.output_type == "error":
                texts.append(f"{out.ename}: {out.evalue}")
            else:  # text representations only; figures are not compared (as with nbval)
                data = out.get("data", {})
                texts.extend(str(data[k]) for k in ("text/plain", "text/markdown", "text/html") if k in data)
        lines = cell.source.strip().splitlines()
        found.append((lines[1] if len(lines) > 1 else "", "".join(texts)))
    return found


def test_checked_outputs_are_reproducible(chapter: Path, smoke: SmokeRuns):
    """A second, independent smoke run (nbval-lax's check, in parallel with the first run):
    cells marked `# NBVAL_CHECK_OUTPUT` must print the same."""
    if not smoke(chapter).ok:
        pytest.fail(f"{chapter.name} did not run in the smoke profile; see the test above")
    first = _checked_outputs(SmokeRuns.output_path(chapter))
    assert first, (
        f"{chapter.name} has no cell starting with `# NBVAL_CHECK_OUTPUT`: mark the cells whose "
        "printed output is deterministic (its check cells, at least) so that the replay compares them"
    )
    replay = smoke.replay(chapter)
    if not replay.ok:
        pytest.fail(f"the second smoke run of {chapter.name} failed:\n{replay.tail()}", pytrace=False)
    second = _checked_outputs(SmokeRuns.replay_path(chapter))
    assert len(first) == len(second)
    differ = [(i, a, b) for i, ((line, a), (_, b)) in enumerate(zip(first, second)) if a != b]
    if differ:
        import difflib

        shown = "\n".join(f"checked cell {i} ({first[i][0]}):\n" + "".join(difflib.unified_diff(
            a.splitlines(True), b.splitlines(True), "first run", "second run", n=1)) for i, a, b in differ[:3])
        pytest.fail(f"{chapter.name}: {len(differ)} checked cell(s) printed differently in two runs:\n{shown}",
                    pytrace=False)
