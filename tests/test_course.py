"""The course edition: `make student` hides every solution, and the autograder tells them apart.

The book's notebooks are the one source of the exercises; tools/course.py turns them into
otter-grader assignments. Here: the student notebooks keep the checks and lose the solutions; the
autograder gives the solutions full marks and the untouched student edition zero.
"""

from __future__ import annotations

import ast
import importlib.util
import shutil
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("course", ROOT / "tools" / "course.py")
course = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(course)


def _exercise_labels(nb) -> list[str]:
    return [course._label(c) for c in nb.cells if course._directive(c, "exercise")]


@pytest.fixture(scope="module")
def edition(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("course")
    course.build_student_edition(out)
    return out


def test_every_chapter_becomes_an_assignment(edition: Path):
    chapters = course.chapters()
    assert chapters, "no chapters found through _toc.yml"
    for chapter in chapters:
        for sub, suffix in [("student", ".ipynb"), ("solutions", ".ipynb"), ("autograder", ".zip")]:
            assert (edition / sub / f"{chapter.stem}{suffix}").exists(), f"{sub} of {chapter.stem} missing"
        labels = _exercise_labels(nbformat.read(chapter, as_version=4))
        assert len(labels) >= 3, f"{chapter.name}: a chapter ends with at least three exercises"
        student = nbformat.read(edition / "student" / chapter.name, as_version=4)
        assert student.metadata[course.CHAPTER_KEY] == chapter.stem
        # Every exercise with a check cell is an autograded question of the same name.
        assert set(student.metadata["otter"]["tests"]) <= set(labels)


def test_student_edition_hides_solutions_and_keeps_checks(edition: Path):
    for chapter in course.chapters():
        book = nbformat.read(chapter, as_version=4)
        student = nbformat.read(edition / "student" / chapter.name, as_version=4)
        text = "\n".join(c.source for c in student.cells)
        solutions = [c for c in book.cells if c.cell_type == "code" and "solution" in c.metadata.get("tags", [])]
        checks = [c for c in book.cells if "check" in c.metadata.get("tags", [])]
        assert solutions and checks, f"{chapter.name} has no tagged solution or check cells"
        for cell in solutions:
            # No statement of a solution survives, except the names a student must define.
            for node in ast.parse(cell.source).body:
                body = node.body if isinstance(node, ast.FunctionDef) else [node]
                for statement in body:
                    line = ast.unparse(statement)
                    if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
                        continue  # a docstring stays: it is part of the task
                    if isinstance(statement, ast.Assign) or len(line) < 25:
                        continue  # `x = ...` prompts keep the name; short lines may recur elsewhere
                    assert line not in text, f"{chapter.name}: the student edition shows solution code {line!r}"
        for cell in checks:
            assert cell.source in text, f"{chapter.name}: a check cell is missing from the student edition"
        assert "{solution-start}" not in text and "{solution-end}" not in text


def test_prompts_keep_signatures_and_docstrings():
    prompt = course._prompt('def f(a, b=2):\n    """Add."""\n    return a + b\n\nx = f(1)\nprint(x)\n')
    assert prompt == 'def f(a, b=2):\n    """Add."""\n    ...  # your code\n\nx = ...  # your code'
    compile(prompt, "prompt", "exec")


def test_malformed_exercises_are_reported(tmp_path: Path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("```{exercise} Lonely\n:label: ch0-ex-lonely\n\nDo it.\n```")]
    path = tmp_path / "00_bad.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(ValueError, match="not followed by its solution-start"):
        course.master_notebook(path)


@pytest.mark.notebooks
def test_solutions_pass_every_check_and_the_student_edition_fails_them(edition: Path, tmp_path: Path):
    """Runs otter's grader on both editions of every chapter (smoke profile, two at a time)."""
    for sub in ("solutions", "student"):
        shutil.copytree(edition / sub, tmp_path / sub)
    solved = course.grade(tmp_path / "solutions", edition, profile="smoke", jobs=2)
    untouched = course.grade(tmp_path / "student", edition, profile="smoke", jobs=2)
    assert len(solved) == len(untouched) == len(course.chapters())
    for row in solved:
        assert row["possible"] >= 1 and row["total"] == row["possible"], f"solutions lose points: {row}"
    for row in untouched:
        assert row["total"] == 0, f"the untouched student edition scores: {row}"
    table = tmp_path / "scores.csv"
    course.write_table(solved + untouched, table)
    assert table.read_text(encoding="utf-8").count("\n") == 1 + len(solved) + len(untouched)


def test_instructor_page_lists_every_exercise_and_chapter():
    page = (ROOT / "book" / "instructors.md").read_text(encoding="utf-8")
    for chapter in course.chapters():
        assert f"{{doc}}`{chapter.stem}`" in page, f"the schedule on book/instructors.md misses {chapter.stem}"
        for label in _exercise_labels(nbformat.read(chapter, as_version=4)):
            assert f"{{ref}}`{label}`" in page, f"book/instructors.md does not place exercise {label}"
