"""The course edition, driven the way an instructor drives it: `make student` and `make grade`.

The book's notebooks are the one source of the exercises; tools/course.py turns them into
otter-grader assignments. Here: `make student` (relative paths, from the repository root) writes
student notebooks that keep the visible checks and lose the solutions and the hidden checks, the
autograders, and the book's HTML without solutions; the autograder gives the solutions full marks
and the untouched student edition zero; `make grade` survives a real class folder.
"""

from __future__ import annotations

import ast
import base64
import csv
import io
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT, SMOKE_DIR, SmokeRuns, chapters as book_chapters, course_tools

course = course_tools()

COURSE_REL = "_build/test-course"  # relative to the repository root, as an instructor would type it
CLASS_REL = "_build/test-class"


def make(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    """`make ARGS` in the repository root, as typed there. Under `make test` this interpreter is
    the Makefile's own (.venv); elsewhere the recipe is pointed at this interpreter."""
    here = [] if Path(sys.prefix).resolve() == (ROOT / ".venv").resolve() else \
        [f"BIN={Path(sys.executable).parent}", "STAMP="]
    return subprocess.run(["make", "--no-print-directory", *args, *here], cwd=ROOT, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def _exercise_labels(nb) -> list[str]:
    return [course._label(c) for c in nb.cells if course._directive(c, "exercise")]


def _tagged(nb, tag: str) -> list:
    return [c for c in nb.cells if tag in c.metadata.get("tags", [])]


@pytest.fixture(scope="module")
def edition(smoke: SmokeRuns) -> Path:
    """`make student COURSE=_build/test-course EXECUTED=_build/smoke`: the edition, with the HTML
    rendered from this session's smoke runs (the book build's inputs too)."""
    failed = [c.name for c in book_chapters() if not smoke(c).ok]
    if failed:
        pytest.fail(f"the student HTML renders the smoke runs, and these failed: {failed}")
    shutil.rmtree(ROOT / COURSE_REL, ignore_errors=True)
    result = make("student", f"COURSE={COURSE_REL}", f"EXECUTED={SMOKE_DIR.relative_to(ROOT)}")
    assert result.returncode == 0, f"make student failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return ROOT / COURSE_REL


# ------------------------------------------------------------------------ fast: no notebook runs
def test_prompts_keep_signatures_and_docstrings():
    prompt = course._prompt('def f(a, b=2):\n    """Add."""\n    return a + b\n\nx = f(1)\nprint(x)\n')
    assert prompt == 'def f(a, b=2):\n    """Add."""\n    ...  # your code\n\nx = ...  # your code'
    compile(prompt, "prompt", "exec")
    # a tuple target becomes one runnable line per name; names inside blocks are prompted; helpers are not
    prompt = course._prompt("a, (b, _c) = 1, (2, 3)\nwith ctx():\n    _u = 1\n    d = _u + 1\nfor i in x:\n    e = i\n")
    assert prompt == "a = ...  # your code\n\nb = ...  # your code\n\nd = ...  # your code\n\ne = ...  # your code"
    exec(compile(prompt, "prompt", "exec"), {})


def test_malformed_exercises_are_reported(tmp_path: Path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("```{exercise} Lonely\n:label: ch0-ex-lonely\n\nDo it.\n```")]
    path = tmp_path / "00_bad.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(ValueError, match="not followed by its solution-start"):
        course.master_notebook(path)


def _one_exercise(*tail_tags: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    nb.cells = [md("# T"), code('REPOSITORY_URL = ""', metadata={"tags": ["remove-input", "setup"]}),
                md("```{exercise} E\n:label: ch0-ex-e\n\nDo it.\n```"),
                md("```{solution-start} ch0-ex-e\n:class: dropdown\n```"),
                code("x = 1", metadata={"tags": ["solution"]}), md("```{solution-end}\n```")]
    nb.cells += [code(f"assert x == 1  # {tag}", metadata={"tags": [tag]}) for tag in tail_tags]
    return nb


def test_hidden_checks_become_hidden_tests_and_leave_the_student_notebook(tmp_path: Path):
    path = tmp_path / "00_one.ipynb"
    nbformat.write(_one_exercise("check", "hidden-check"), path)
    master = course.master_notebook(path)
    text = "\n".join(c.source for c in master.cells)
    tests = [c.source for c in master.cells if c.source.lstrip().startswith(("def test_", "# HIDDEN"))]
    assert len(tests) == 2 and tests[1].startswith("# HIDDEN\n") and not tests[0].startswith("# HIDDEN")
    # outside the tests block, only the visible check is handed to the student
    assert text.count("# check") == 2 and text.count("# hidden-check") == 1
    # and the HTML edition drops the hidden check and the solution
    kept = "\n".join(c.source for c in course.without_solutions(_one_exercise("check", "hidden-check")).cells)
    assert "# check" in kept and "hidden-check" not in kept and "x = 1" not in kept and "Do it." in kept


@pytest.mark.parametrize("tags, message", [(("hidden-check",), "no visible one"),
                                           (("check", "hidden-check", "check", "hidden-check"), "must follow")])
def test_misplaced_hidden_checks_are_refused(tmp_path: Path, tags, message):
    nb = _one_exercise(*tags[:2])
    nb.cells += [nbformat.v4.new_code_cell("pass", metadata={"tags": [t]}) for t in tags[2:]]
    if len(tags) > 2:
        nb.cells.insert(len(nb.cells) - 2, nbformat.v4.new_markdown_cell("text between"))
    path = tmp_path / "00_bad.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(ValueError, match=message):
        course.master_notebook(path)


def test_otter_imports_are_found_in_code_and_nowhere_else():
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    nb = nbformat.v4.new_notebook(cells=[
        md("import otter"),  # prose
        code("# the grader also compares C(lam)\nimport numpy as np\nx = 'import otter'\nimport otterly"),
        code("import otter\ngrader = otter.Notebook('ch.ipynb')"),  # otter's init cell
        code("%pip install -q otter-grader\nif True:\n    from otter.test_files import test_case"),
        code("import os, otter.api as api"),
        code("def unfinished(:\n    pass\nfrom otter import Notebook"),  # not Python yet
        code("from . import otter_free"),
    ])
    assert course.otter_imports(nb) == [2, 3, 4, 5]


def _kernel(nb):
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def test_student_notebooks_need_no_otter_and_the_build_says_when_they_would(tmp_path: Path, monkeypatch):
    """Students open their notebooks where otter-grader is not installed (Colab lacks it): otter assign
    must add no otter cell, and `make student` refuses a student notebook that imports otter."""
    path = tmp_path / "00_one.ipynb"
    nbformat.write(_kernel(_one_exercise("check", "hidden-check")), path)
    monkeypatch.setattr(course, "chapters", lambda: [path])
    assert course.build_student_edition(tmp_path / "course") == ["00_one"]
    student = nbformat.read(tmp_path / "course" / "student" / path.name, as_version=4)
    assert "assert x == 1  # check" in "\n".join(c.source for c in student.cells)
    assert course.otter_imports(student) == []
    # ... and it carries the library: its setup cell installs the wheel it embeds where neuralode is missing
    (setup,) = [c for c in student.cells if "setup" in c.metadata.get("tags", [])]
    (call,) = re.findall(r'^install_neuralode\("(neuralode-[^"]+\.whl)", "([A-Za-z0-9+/=]+)"\)$', setup.source, re.M)
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(call[1]))) as wheel:
        assert "neuralode/_odeint.py" in wheel.namelist()

    master_notebook = course.master_notebook

    def with_otters_init_cell(chapter):  # what otter assign writes with its default config
        nb = master_notebook(chapter)
        assert "init_cell: false" in nb.cells[0].source
        nb.cells[0].source = nb.cells[0].source.replace("init_cell: false", "init_cell: true")
        return nb

    monkeypatch.setattr(course, "master_notebook", with_otters_init_cell)
    with pytest.raises(RuntimeError, match="00_one.ipynb imports otter .*Colab lacks it"):
        course.build_student_edition(tmp_path / "course")


def test_every_checked_exercise_hides_its_reference():
    """A visible check says whether a student is on the right track; the comparison with the
    answer is the grader's (a hidden check), so that copying a check cell cannot pass it."""
    for chapter in course.chapters():
        nb = nbformat.read(chapter, as_version=4)
        master = course.master_notebook(chapter)  # raises on a misplaced hidden check
        assert _tagged(nb, "hidden-check"), f"{chapter.name} has no hidden checks"
        starts = [k for k, cell in enumerate(nb.cells) if course._directive(cell, "exercise")]
        for start, end in zip(starts, starts[1:] + [len(nb.cells)]):
            tags = [set(c.metadata.get("tags", [])) for c in nb.cells[start:end]]
            if any("check" in t for t in tags):
                assert any("hidden-check" in t for t in tags), (
                    f"{chapter.name}: exercise {course._label(nb.cells[start])} has visible checks but no hidden one")
        assert any(c.source.startswith("# HIDDEN") for c in master.cells)


def test_grade_says_what_is_missing(tmp_path: Path):
    (tmp_path / "subs").mkdir()
    result = make("grade", f"SUBMISSIONS={tmp_path / 'subs'}", f"COURSE={tmp_path / 'no-course'}")
    assert result.returncode != 0 and "run `make student` first" in result.stderr, result.stderr


def test_make_clean_removes_the_build_and_keeps_the_environment(tmp_path: Path):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")  # not here: it would delete this run's _build
    (tmp_path / "_build" / "html").mkdir(parents=True)
    (tmp_path / ".venv").mkdir()
    result = subprocess.run(["make", "clean"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "_build").exists() and (tmp_path / ".venv").is_dir()


# -------------------------------------------------------------------- `make student`, as typed
@pytest.mark.notebooks
def test_every_chapter_becomes_an_assignment(edition: Path):
    chapters = course.chapters()
    assert chapters, "no chapters found through _toc.yml"
    for chapter in chapters:
        for sub, suffix in [("student", ".ipynb"), ("solutions", ".ipynb"), ("autograder", ".zip")]:
            assert (edition / sub / f"{chapter.stem}{suffix}").exists(), f"{sub} of {chapter.stem} missing"
        book = nbformat.read(chapter, as_version=4)
        labels = _exercise_labels(book)
        assert len(labels) >= 3, f"{chapter.name}: a chapter ends with at least three exercises"
        student = nbformat.read(edition / "student" / chapter.name, as_version=4)
        assert student.metadata[course.CHAPTER_KEY] == chapter.stem
        assert course.otter_imports(student) == [], f"{chapter.name}: the student notebook needs otter-grader"
        # Every exercise with a check cell is an autograded question of the same name.
        assert set(student.metadata["otter"]["tests"]) <= set(labels)
        # The autograder holds every hidden check, as a hidden test.
        with zipfile.ZipFile(edition / "autograder" / f"{chapter.stem}.zip") as z:
            tests = "\n".join(z.read(n).decode() for n in z.namelist() if n.startswith("tests/"))
        assert tests.count("hidden=True") == len(_tagged(book, "hidden-check")), chapter.name


@pytest.mark.notebooks
def test_student_edition_hides_solutions_and_hidden_checks_and_keeps_checks(edition: Path):
    for chapter in course.chapters():
        book = nbformat.read(chapter, as_version=4)
        student = nbformat.read(edition / "student" / chapter.name, as_version=4)
        text = "\n".join(c.source for c in student.cells)
        solutions = _tagged(book, "solution")
        checks, hidden = _tagged(book, "check"), _tagged(book, "hidden-check")
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
        for cell in hidden:
            assert cell.source not in text, f"{chapter.name}: the student edition shows a hidden check"
        assert "{solution-start}" not in text and "{solution-end}" not in text


def _html_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


@pytest.mark.notebooks
def test_student_html_has_no_solutions_and_builds_cleanly(edition: Path, book_build):
    html = edition / "html"
    log = (edition / "html-build.log").read_text(encoding="utf-8")
    warnings = [ln for ln in log.splitlines() if "WARNING" in ln or "ERROR" in ln]
    assert not warnings, "the student HTML build warns:\n" + "\n".join(warnings[:20])
    for chapter in course.chapters():
        page = _html_text(html / "book" / f"{chapter.stem}.html")
        public = _html_text(book_build.html / "book" / f"{chapter.stem}.html")
        assert "solution" in public and 'class="solution' in public  # the public book keeps them
        assert 'class="solution' not in page, f"{chapter.stem}: the student HTML shows a solution"
        assert page.count('class="exercise') == public.count('class="exercise') >= 3
        book = nbformat.read(chapter, as_version=4)
        secret = _tagged(book, "solution") + _tagged(book, "hidden-check")
        public = "\n".join(c.source for c in book.cells if c not in secret)
        download = _html_text(html / "_sources" / "book" / chapter.name)
        for cell in secret:  # lines of a solution or a hidden check that the chapter has nowhere else
            prompt = {ln.strip() for ln in course._prompt(cell.source).splitlines()}  # signatures may stay
            for line in {ln.strip() for ln in cell.source.splitlines()} - prompt:
                if len(line) >= 25 and line not in public:
                    assert line not in download, f"{chapter.stem}: the student download offers {line!r}"
        downloaded = nbformat.read(html / "_sources" / "book" / chapter.name, as_version=4)
        assert downloaded.metadata.get(course.CHAPTER_KEY) == chapter.stem  # the assignment itself
    assert "(student edition)" in _html_text(html / "book" / "intro.html")


@pytest.mark.notebooks
def test_student_html_renders_make_books_cache_or_executes(smoke: SmokeRuns, tmp_path: Path):
    """Without EXECUTED, `make student` renders the outputs make book cached, and executes a
    notebook the cache does not hold."""
    from jupyter_cache import get_cache

    chapter = book_chapters()[0]
    assert smoke(chapter).ok
    # What make book leaves in its cache: the chapter as committed, with its executed outputs.
    executed = [c for c in nbformat.read(SmokeRuns.output_path(chapter), 4).cells
                if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])]
    as_built = nbformat.read(chapter, 4)
    code = [c for c in as_built.cells if c.cell_type == "code"]
    assert [c.source for c in code] == [c.source for c in executed]
    for cell, run in zip(code, executed):
        cell.outputs, cell.execution_count = run.outputs, run.execution_count
    nbformat.write(as_built, tmp_path / chapter.name)
    get_cache(tmp_path / "cache").cache_notebook_file(tmp_path / chapter.name, uri=str(chapter), check_validity=False)

    cached = course._executed(chapter, None, cache_dir=tmp_path / "cache")
    assert [c.outputs for c in cached.cells if c.cell_type == "code"] == [c.outputs for c in executed]
    assert any(c.outputs for c in executed)

    tiny = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")])
    tiny.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(tiny, tmp_path / "tiny.ipynb")
    executed = course._executed(tmp_path / "tiny.ipynb", None, cache_dir=tmp_path / "cache")
    assert executed.cells[0].outputs[0]["text"].strip() == "42"


@pytest.mark.notebooks
def test_solutions_pass_every_check_and_the_student_edition_fails_them(edition: Path, tmp_path: Path):
    """Runs otter's grader on both editions of every chapter (smoke profile, two at a time)."""
    for sub in ("solutions", "student"):
        shutil.copytree(edition / sub, tmp_path / sub)
    solved = course.grade(tmp_path / "solutions", edition, profile="smoke", jobs=2)
    untouched = course.grade(tmp_path / "student", edition, profile="smoke", jobs=2)
    assert len(solved) == len(untouched) == len(course.chapters())
    for row in solved:
        assert row["status"] == "graded" and row["possible"] >= 1 and row["total"] == row["possible"], \
            f"solutions lose points: {row}"
    for row in untouched:
        assert row["status"] == "graded" and row["total"] == 0, f"the untouched student edition scores: {row}"


def _cell_defining(nb, name: str):
    return next(c for c in nb.cells if c.cell_type == "code" and f"def {name}(" in c.source)


@pytest.mark.notebooks
def test_make_grade_survives_a_real_class(edition: Path):
    """One folder as a class hands it in: correct, half-correct, crashing, looping, metadata
    stripped, not a notebook. Every student gets a row and a reason; none stops the others."""
    stem = "01_resnets_are_euler"
    solved = nbformat.read(edition / "solutions" / f"{stem}.ipynb", as_version=4)
    student = nbformat.read(edition / "student" / f"{stem}.ipynb", as_version=4)
    labels = list(student.metadata["otter"]["tests"])
    folder = ROOT / CLASS_REL
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)

    def write(name: str, nb) -> None:
        nbformat.write(nb, folder / name)

    write("a_loops.ipynb", _edited(solved, "euler_resnet", "while True:\n    pass\n"))  # first: runs beside the rest
    write("bob.ipynb", solved)
    half = _edited(solved, "euler_resnet", _cell_defining(student, "euler_resnet").source)  # one left undone
    write("carol.ipynb", half)
    write("dave.ipynb", _edited(solved, "euler_resnet", None, prefix='raise RuntimeError("my bug")\n'))
    stripped = nbformat.from_dict(dict(solved))
    stripped.metadata = {}
    write("erin.ipynb", stripped)
    (folder / "frank.ipynb").write_text("{ not a notebook", encoding="utf-8")

    result = make("grade", f"SUBMISSIONS={CLASS_REL}", f"COURSE={edition}", "TIMEOUT=150", "JOBS=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(folder / "scores.csv", encoding="utf-8") as f:
        rows = {r["submission"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["a_loops.ipynb", "bob.ipynb", "carol.ipynb", "dave.ipynb", "erin.ipynb", "frank.ipynb"]
    assert all(r["reason"] for r in rows.values()), rows
    possible = float(len(labels))
    euler = "ch1-ex-euler-resnet"
    assert euler in labels

    def total(name):
        return float(rows[name]["total"])

    assert rows["bob.ipynb"]["status"] == "graded" and total("bob.ipynb") == possible
    assert rows["erin.ipynb"]["status"] == "graded" and total("erin.ipynb") == possible
    assert "metadata" in rows["erin.ipynb"]["reason"]
    for name in ("carol.ipynb", "dave.ipynb"):
        assert rows[name]["status"] == "graded" and 0 < total(name) < possible, rows[name]
        assert float(rows[name][euler]) < 1 and euler in rows[name]["reason"], rows[name]
    assert rows["a_loops.ipynb"]["status"] == "timeout" and total("a_loops.ipynb") == 0
    assert float(rows["a_loops.ipynb"]["possible"]) == possible
    assert rows["frank.ipynb"]["status"] == "unreadable" and total("frank.ipynb") == 0


def _edited(nb, name: str, source: str | None, prefix: str = ""):
    """A copy of ``nb`` whose cell defining ``name`` reads ``source`` (or its own, after ``prefix``)."""
    nb = nbformat.from_dict(nbformat.reads(nbformat.writes(nb), as_version=4))
    cell = _cell_defining(nb, name)
    cell.source = prefix + (cell.source if source is None else source)
    return nb


def test_instructor_page_lists_every_exercise_and_chapter():
    page = (ROOT / "book" / "instructors.md").read_text(encoding="utf-8")
    for chapter in course.chapters():
        assert f"{{doc}}`{chapter.stem}`" in page, f"the schedule on book/instructors.md misses {chapter.stem}"
        for label in _exercise_labels(nbformat.read(chapter, as_version=4)):
            assert f"{{ref}}`{label}`" in page, f"book/instructors.md does not place exercise {label}"
