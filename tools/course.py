"""The course edition: student notebooks without solutions, and an autograder, built with otter-grader.

Each chapter of the book is the single source of its exercises. An exercise there is

    ```{exercise} ...          (markdown, with :label: chN-ex-name)
    given cells                (code the exercise sets up, optional)
    ```{solution-start} ...    (markdown)
    solution cells             (code tagged "solution", and markdown)
    ```{solution-end}          (markdown)
    check cells                (code tagged "check": the student sees and runs them)
    hidden check cells         (code tagged "hidden-check": the grader's, hidden from the student)

A "check" cell tells a student whether they are on the right track without computing the answer
(a property, a special case, an order of convergence); a "hidden-check" cell compares with the
reference answer, and so stays out of everything a student is given.

``student`` turns every chapter into an otter-assign "master" notebook (one otter question per
exercise: the exercise is the prompt, the solution cells its solution block, the check cells its
tests), runs ``otter assign``, and collects

    OUT/student/NN_chapter.ipynb        to hand out: solutions replaced by prompts, visible checks kept
                                        (plain cells: the notebook needs no otter-grader, e.g. on Colab);
                                        its setup cell carries the library's wheel (tools/downloads.py)
    OUT/autograder/NN_chapter.zip       otter's autograder for the chapter (visible and hidden tests)
    OUT/solutions/NN_chapter.ipynb      otter's solution notebook (the book's code)
    OUT/html/index.html                 the book as HTML without solutions or hidden checks

The HTML edition renders the executed chapters: by default the outputs that ``make book`` left in
its execution cache (``_build/.jupyter_cache``), a chapter missing there is executed first; with
``--executed DIR``, the executed notebooks in DIR (the test suite passes its smoke runs).

``grade`` runs ``otter run`` (otter's grader without Docker) on every submitted notebook in a
folder, each in its own process with a time limit, and writes a score table with one row per
notebook and a reason for each score; a notebook that crashes, loops or cannot be read scores
zero and never stops the others. Submissions execute in the ``smoke`` profile unless told
otherwise: the checks grade the exercises, not the size of the chapter's experiments.

Grading runs the students' code on the grader's machine with the grader's rights: run it in a
container or under a throwaway account (book/instructors.md says how).

    python tools/course.py student [--out _build/course] [--no-html] [--executed DIR]
    python tools/course.py grade SUBMISSIONS_DIR [--course _build/course] [--profile smoke] [--timeout 600]
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHAPTER_KEY = "neuralode_chapter"  # notebook metadata naming the chapter a notebook belongs to
CHECK, HIDDEN_CHECK = "check", "hidden-check"  # cell tags: the student's checks, the grader's


def chapters() -> list[Path]:
    """The numbered chapter notebooks (``book/NN_*.ipynb``), in the order of _toc.yml; appendix
    notebooks such as the benchmarks page have no exercises and are not assignments."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    files = [ROOT / f"{c['file']}.ipynb" for part in toc["parts"] for c in part["chapters"]]
    return [f for f in files if f.exists() and re.match(r"\d\d_", f.name)]


# ------------------------------------------------------------------------------- the master notebook
def _directive(cell, name: str) -> bool:
    return cell.cell_type == "markdown" and re.match(r"^`{3,}\{" + name + r"\}", cell.source.lstrip()) is not None


def _label(exercise_cell) -> str:
    found = re.search(r"^:label:\s*(\S+)", exercise_cell.source, flags=re.M)
    if not found:
        raise ValueError(f"an exercise has no :label: line:\n{exercise_cell.source[:200]}")
    return found.group(1)


def _prompt(source: str) -> str:
    """What a student sees instead of a solution cell: the names it defines, with ``...`` for values.

    ``def f(a, b): <body>`` becomes ``def f(a, b):`` with its docstring and ``...``; ``x = <expr>``
    becomes ``x = ...``, and ``a, b = <expr>`` one such line per name, so that the prompt runs. The
    names a solution defines inside ``with``, ``if``, ``for`` or ``try`` blocks are prompted too;
    names starting with an underscore are the solution's helpers and are left out, as are all
    other statements.
    """
    lines, seen = [], set()

    def names(target) -> list[str]:
        if isinstance(target, (ast.Tuple, ast.List)):
            return [n for element in target.elts for n in names(element)]
        return [target.id] if isinstance(target, ast.Name) else []

    def visit(body) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in seen:
                seen.add(node.name)
                stub = ast.FunctionDef(name=node.name, args=node.args, body=[], decorator_list=node.decorator_list,
                                       returns=node.returns, type_params=[])
                doc = ast.get_docstring(node, clean=False)
                stub.body = ([ast.Expr(ast.Constant(doc))] if doc else []) + [ast.Expr(ast.Constant(...))]
                lines.append(ast.unparse(ast.fix_missing_locations(stub)).replace("\n    ...", "\n    ...  # your code"))
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for name in [n for t in targets for n in names(t)]:
                    if not name.startswith("_") and name not in seen:
                        seen.add(name)
                        lines.append(f"{name} = ...  # your code")
            else:  # the blocks a solution may wrap its answer in (no_grad, a loop, a guard)
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(node, field, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(ast.parse(source).body)
    return "\n\n".join(lines) if lines else "# your code"


def _solution_cell(cell):
    """A solution code cell in otter's syntax: the prompt as a string, the solution between markers."""
    prompt = _prompt(cell.source).replace('"""', "'''")
    source = f'""" # BEGIN PROMPT\n{prompt}\n""" # END PROMPT\n# BEGIN SOLUTION NO PROMPT\n{cell.source}\n# END SOLUTION'
    return nbformat.v4.new_code_cell(source, metadata={"tags": ["solution"]})


def _tags(cell) -> list[str]:
    return cell.metadata.get("tags", [])


def _test_cell(check_cell, index: int):
    """A check cell as an otter exception-based test: it runs in a copy of the notebook's globals
    and passes when it raises nothing. A hidden-check cell becomes a hidden test (otter reads the
    ``# HIDDEN`` first line): it is graded but never shown to the student."""
    hidden = HIDDEN_CHECK in _tags(check_cell)
    name = f"test_{'hidden' if hidden else 'check'}_{index}"
    source = (("# HIDDEN\n" if hidden else "") +
              f"def {name}(env):\n    exec(compile({check_cell.source!r}, 'check cell', 'exec'), dict(env))\n\n"
              f"{name}(globals())")
    return nbformat.v4.new_code_cell(source)


def master_notebook(chapter: Path) -> nbformat.NotebookNode:
    """The chapter as an otter-assign master notebook (otter's v1 format)."""
    nb = nbformat.read(chapter, as_version=4)
    raw = nbformat.v4.new_raw_cell
    # No otter cells (init, check, check-all, export) for the student: the student notebooks run where
    # otter-grader is not installed, on Colab too (build_student_edition checks it: otter_imports).
    config = {"name": chapter.stem, "init_cell": False, "check_all_cell": False, "export_cell": False,
              "run_tests": False, "solutions_pdf": False, "generate": {"pdf": False, "filtering": False},
              "tests": {"ok_format": False}}
    cells = [raw("# ASSIGNMENT CONFIG\n" + yaml.safe_dump(config, sort_keys=False))]
    i, n_questions = 0, 0
    while i < len(nb.cells):
        cell = nb.cells[i]
        if not _directive(cell, "exercise"):
            cells.append(cell)
            i += 1
            continue
        label, i = _label(cell), i + 1
        given = []  # cells the exercise sets up for the student (data, a model to work on)
        while i < len(nb.cells) and not _directive(nb.cells[i], "solution-start") and \
                not _directive(nb.cells[i], "exercise") and nb.cells[i].cell_type == "code":
            given.append(nb.cells[i])
            i += 1
        if i >= len(nb.cells) or not _directive(nb.cells[i], "solution-start"):
            raise ValueError(f"{chapter.name}: exercise {label} is not followed by its solution-start cell")
        i += 1
        solution = []
        while i < len(nb.cells) and not _directive(nb.cells[i], "solution-end"):
            if "{solution-end}" in nb.cells[i].source:
                raise ValueError(f"{chapter.name}: put the solution-end of {label} in a cell of its own")
            solution.append(nb.cells[i])
            i += 1
        if i == len(nb.cells):
            raise ValueError(f"{chapter.name}: exercise {label} has no solution-end cell")
        i += 1
        checks, hidden = [], []  # the student's checks, then the grader's hidden ones
        while i < len(nb.cells) and CHECK in _tags(nb.cells[i]):
            checks.append(nb.cells[i])
            i += 1
        while i < len(nb.cells) and HIDDEN_CHECK in _tags(nb.cells[i]):
            hidden.append(nb.cells[i])
            i += 1
        if hidden and not checks:
            raise ValueError(f"{chapter.name}: exercise {label} has hidden checks but no visible one; give "
                             "the student a check cell that says whether they are on the right track")
        question = {"name": label, "points": 1, "check_cell": False}
        if not checks:
            question["manual"] = True
        cells += [raw("# BEGIN QUESTION\n" + yaml.safe_dump(question, sort_keys=False)), cell, *given,
                  raw("# BEGIN SOLUTION")]
        cells += [_solution_cell(c) if c.cell_type == "code" else c for c in solution]
        cells.append(raw("# END SOLUTION"))
        if checks:
            cells.append(raw("# BEGIN TESTS"))
            cells += [_test_cell(c, k) for k, c in enumerate(checks + hidden)]
            cells.append(raw("# END TESTS"))
        cells.append(raw("# END QUESTION"))
        cells += checks  # the visible checks stay in the student's notebook, for the student to run
        n_questions += 1
    if not n_questions:
        raise ValueError(f"{chapter.name} has no exercises")
    stray = [c for c in cells if HIDDEN_CHECK in _tags(c)]
    if stray:
        raise ValueError(f"{chapter.name}: a hidden-check cell must follow an exercise's check cells; this one "
                         f"does not and would be handed to students:\n{stray[0].source[:200]}")
    nb.cells = cells
    nb.metadata[CHAPTER_KEY] = chapter.stem
    return nb


# ------------------------------------------------------------------------------------ otter's tools
def _otter(*args: str, cwd: Path, env=None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "otter", *args], cwd=cwd, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"otter {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def otter_imports(nb) -> list[int]:
    """The indices of the code cells that import otter-grader (``import otter``, ``from otter ...``).

    A student notebook has none: students open it where otter-grader is not installed (Colab lacks
    it), and need none, since their checks are plain cells; only ``make student`` and ``make grade``
    run otter. Cells are read as IPython reads them, so a magic such as ``%pip`` is no error.
    """
    from IPython.core.inputtransformer2 import TransformerManager

    found = []
    for k, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        source = TransformerManager().transform_cell(cell.source)
        try:
            nodes = list(ast.walk(ast.parse(source)))
            modules = [alias.name for node in nodes if isinstance(node, ast.Import) for alias in node.names]
            modules += [node.module or "" for node in nodes if isinstance(node, ast.ImportFrom)]
        except SyntaxError:  # a cell a student has yet to complete: read its import lines
            modules = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", source, flags=re.M)
        if any(m == "otter" or m.startswith("otter.") for m in modules):
            found.append(k)
    return found


def _downloads():
    """tools/downloads.py (the wheel a downloaded notebook carries), loaded by path: this file is
    also loaded by path, by the tests, with tools/ not on sys.path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("neuralode_book_downloads", Path(__file__).with_name("downloads.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_student_edition(out: Path) -> list[str]:
    """Write OUT/student, OUT/autograder and OUT/solutions for every chapter; return the chapter stems."""
    out = out.resolve()  # otter runs in another working directory
    if out.exists():
        shutil.rmtree(out)
    for sub in ("student", "autograder", "solutions", "masters"):
        (out / sub).mkdir(parents=True)
    stems = []
    # The student notebooks carry the library, as the book's downloads do (tools/downloads.py): on
    # Colab the setup cell installs it from this wheel; where neuralode is installed (grading) it does nothing.
    wheel = _downloads().build_wheel(out / "wheel")
    for chapter in chapters():
        master = out / "masters" / chapter.name
        nbformat.write(master_notebook(chapter), master)
        with tempfile.TemporaryDirectory() as tmp:
            dist = Path(tmp) / "dist"
            _otter("assign", "-v", str(master), str(dist), cwd=out / "masters")
            student = dist / "student" / chapter.name
            nb = nbformat.read(student, as_version=4)
            uses = otter_imports(nb)
            if uses:
                raise RuntimeError(
                    f"otter assign's student notebook of {chapter.name} imports otter (cell {uses[0]}), which "
                    "students do not have (Colab lacks it): keep otter's init, check, check-all and export cells "
                    "off in master_notebook's assignment config (students run the check cells themselves), or "
                    "give the notebook a cell that installs otter-grader where it is missing")
            nb = _downloads().embed_wheel(nb, wheel, name=f"the student notebook of {chapter.name}")
            nb.metadata[CHAPTER_KEY] = chapter.stem
            nbformat.write(nb, out / "student" / chapter.name)
            shutil.copy(dist / "autograder" / chapter.name, out / "solutions" / chapter.name)
            zips = sorted((dist / "autograder").glob("*.zip"))
            if len(zips) != 1:
                raise RuntimeError(f"otter assign made {len(zips)} autograder zips for {chapter.name}")
            shutil.copy(zips[0], out / "autograder" / f"{chapter.stem}.zip")
        stems.append(chapter.stem)
    return stems


# ------------------------------------------------------------------------------ the student's book
def book_notebooks() -> list[Path]:
    """Every notebook the book renders (chapters and appendices), in the order of _toc.yml."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    files = [ROOT / f"{c['file']}.ipynb" for part in toc["parts"] for c in part["chapters"]]
    return [f for f in files if f.exists()]


def copy_book_sources(dest: Path, config: dict) -> None:
    """A buildable copy of the book in ``dest``: _toc.yml, ``config`` as _config.yml, book/, and the
    folders the build reads (_static, tools/ with the book's Sphinx extensions)."""
    shutil.rmtree(dest, ignore_errors=True)  # a fresh build: stale pages hide warnings
    dest.mkdir(parents=True)
    shutil.copy2(ROOT / "_toc.yml", dest / "_toc.yml")
    with open(dest / "_config.yml", "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    ignore = shutil.ignore_patterns(".ipynb_checkpoints", "_build", "__pycache__")
    shutil.copytree(ROOT / "book", dest / "book", ignore=ignore)
    for folder in ("_static", "tools"):
        if (ROOT / folder).is_dir():
            shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)


def without_solutions(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The notebook less every solution (the cells from ``{solution-start}`` to ``{solution-end}``)
    and every hidden check."""
    kept, inside = [], False
    for cell in nb.cells:
        if _directive(cell, "solution-start"):
            inside = True
        elif _directive(cell, "solution-end"):
            inside = False
        elif not inside and HIDDEN_CHECK not in _tags(cell):
            kept.append(cell)
    nb = nbformat.from_dict(dict(nb))
    nb.cells = kept
    return nb


BOOK_CACHE = ROOT / "_build" / ".jupyter_cache"  # make book's execution cache (_config.yml)


def _executed(notebook: Path, executed_dir: Path | None, cache_dir: Path = BOOK_CACHE) -> nbformat.NotebookNode:
    """The notebook with its outputs: from ``executed_dir``, else from the book's execution cache,
    else executed now (in the profile NEURALODE_PROFILE names, as ``make book`` would)."""
    if executed_dir is not None:
        path = executed_dir / notebook.name
        if not path.is_file():
            raise FileNotFoundError(f"no executed copy of {notebook.name} in {executed_dir}")
        return nbformat.read(path, as_version=4)
    source = nbformat.read(notebook, as_version=4)
    if cache_dir.is_dir():
        from jupyter_cache import get_cache
        try:
            return nbformat.from_dict(dict(get_cache(cache_dir).merge_match_into_notebook(source)[1]))
        except KeyError:
            pass  # not executed by `make book` (or since changed)
    from nbclient import NotebookClient
    print(f"executing {notebook.name} (not in make book's cache, {cache_dir})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        NotebookClient(source, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp}}).execute()
    return source


def build_student_book(out: Path, executed_dir: Path | None = None) -> Path:
    """The book's HTML without solutions or hidden checks, in OUT/html; return the log of the build.

    Renders executed notebooks with execution off (see ``_executed``); the download button of a
    chapter offers its student notebook (OUT/student, written by ``build_student_edition``)."""
    out = out.resolve()
    source = out / "book-src"
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    config["title"] = f"{config.get('title', 'The book')} (student edition)"
    config.setdefault("execute", {})["execute_notebooks"] = "off"
    copy_book_sources(source, config)
    for notebook in book_notebooks():
        nb = without_solutions(_executed(notebook, executed_dir))
        nbformat.write(nb, source / notebook.relative_to(ROOT))
    result = subprocess.run([str(Path(sys.executable).parent / "jupyter-book"), "build", str(source), "-n",
                             "--keep-going"], capture_output=True, text=True)
    (out / "html-build.log").write_text(result.stdout + result.stderr, encoding="utf-8")
    if result.returncode:
        raise RuntimeError(f"the student edition's HTML build failed (log: {out / 'html-build.log'}):\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    html = out / "html"
    shutil.rmtree(html, ignore_errors=True)
    shutil.move(source / "_build" / "html", html)
    for student in (out / "student").glob("*.ipynb"):  # the download button hands out the assignment
        target = html / "_sources" / "book" / student.name
        if target.exists():
            shutil.copy(student, target)
    shutil.rmtree(source)
    return out / "html-build.log"


# ----------------------------------------------------------------------------------------- grading
def _title(nb) -> str | None:
    """The first level-one heading of a notebook (its chapter title)."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            found = re.search(r"^#\s+(.+?)\s*$", cell.source, flags=re.M)
            if found:
                return found.group(1)
    return None


def identify_chapter(nb, path: Path, course: Path) -> str | None:
    """The chapter a submission belongs to: its metadata, else its title, else its file name.

    Students' tools strip metadata (a "clear metadata" button, another editor, a copy-paste into a
    new notebook): the chapter's title or a file name such as ``02_solving_odes-alice.ipynb`` still
    tell."""
    known = sorted(p.stem for p in (course / "autograder").glob("*.zip"))
    stem = nb.metadata.get(CHAPTER_KEY)
    if stem in known:
        return stem
    title = _title(nb)
    by_title = [s for s in known if title and _title(nbformat.read(course / "student" / f"{s}.ipynb", 4)) == title]
    if len(by_title) == 1:
        return by_title[0]
    by_name = [s for s in known if s in path.stem or path.stem.startswith(s[:3])]
    return by_name[0] if len(by_name) == 1 else None


def _failure(test: dict) -> str:
    """One line of why an otter test case failed."""
    lines = [ln.strip() for ln in (test.get("output") or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
    return (errors or lines or ["failed"])[-1][:200]


def grade_one(path: Path, course: Path, profile: str = "smoke", timeout: float = 600) -> dict:
    """Grade one submitted notebook with otter's grader, in a process of its own killed after
    ``timeout`` seconds. Never raises: a submission that cannot be graded gets zero and a reason.

    Returns ``{"chapter", "status", "total", "possible", <question>: score, ..., "reason"}``; status
    is ``graded``, ``unreadable``, ``unknown chapter``, ``timeout`` or ``grader error``.
    """
    row = {"chapter": "", "status": "", "total": 0.0, "possible": 0.0}
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as error:  # not JSON, not a notebook
        return {**row, "status": "unreadable", "reason": f"not a readable notebook: {error}"[:300]}
    stem = identify_chapter(nb, path, course)
    if stem is None:
        return {**row, "status": "unknown chapter",
                "reason": "neither its metadata, its title nor its file name names a chapter of the course"}
    assignment = nbformat.read(course / "student" / f"{stem}.ipynb", as_version=4).metadata
    row.update(chapter=stem, possible=float(len(assignment["otter"]["tests"])))  # one point a question
    repaired = CHAPTER_KEY not in nb.metadata
    env = dict(os.environ, NEURALODE_PROFILE=profile)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        submission = tmp / "submission" / path.name
        submission.parent.mkdir()
        # otter reads the notebook's metadata: give a stripped notebook its assignment's metadata back
        nb.metadata = {**assignment, **nb.metadata}
        nbformat.write(nb, submission)
        args = [sys.executable, "-m", "otter", "run", "-a", str(course / "autograder" / f"{stem}.zip"),
                "-o", str(tmp), "--no-logo", str(submission)]
        # A session of its own, so that a timeout kills otter's kernel and whatever the student started.
        proc = subprocess.Popen(args, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {**row, "status": "timeout",
                    "reason": f"did not finish within {timeout:g} s (an endless loop, or far too much work); scored 0"}
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        results_file = tmp / "results.json"
        if proc.returncode or not results_file.exists():
            last = [ln for ln in log.splitlines() if ln.strip()][-1:] or ["no output"]
            return {**row, "status": "grader error", "reason": f"otter run failed: {last[0][:250]}"}
        results = json.loads(results_file.read_text(encoding="utf-8"))
    graded = [test for test in results["tests"] if test.get("max_score") is not None]  # not the summary
    scores = {test["name"]: float(test["score"]) for test in graded}
    failed = [test for test in graded if float(test["score"]) < float(test["max_score"])]
    reason = ("every check passes" if not failed else
              "; ".join(f"{t['name']}: {_failure(t)}" for t in failed))
    if repaired:
        reason = f"(metadata stripped; chapter told by its title or file name) {reason}"
    return {**row, "status": "graded", "total": sum(scores.values()),
            "possible": sum(float(test["max_score"]) for test in graded), **scores, "reason": reason}


def submitted_notebooks(submissions: Path) -> list[Path]:
    return sorted(p for p in submissions.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def grade(submissions: Path, course: Path, profile: str = "smoke", jobs: int = 1, timeout: float = 600) -> list[dict]:
    """Grade every ``*.ipynb`` under ``submissions`` (``jobs`` at a time); one row per notebook."""
    submissions, course = submissions.resolve(), course.resolve()
    if not sorted((course / "autograder").glob("*.zip")):
        raise FileNotFoundError(f"no autograders in {course / 'autograder'}: run `make student` first "
                                "(or pass the folder it wrote as --course)")
    if not submissions.is_dir():
        raise FileNotFoundError(f"no folder {submissions}: put the submitted notebooks in a folder and pass it "
                                "(make grade SUBMISSIONS=folder)")
    paths = submitted_notebooks(submissions)
    if not paths:
        raise FileNotFoundError(f"no .ipynb files under {submissions}")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda p: grade_one(p, course, profile, timeout), paths))
    return [{"submission": str(p.relative_to(submissions)), **r} for p, r in zip(paths, results)]


def write_table(rows: list[dict], path: Path) -> None:
    """A CSV with one row per submission; the reason comes last."""
    fields = []
    for row in rows:
        fields += [k for k in row if k not in fields and k != "reason"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields + ["reason"], restval="")
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("student", help="write the student edition, the autograders and the student HTML book")
    s.add_argument("--out", type=Path, default=ROOT / "_build" / "course")
    s.add_argument("--no-html", action="store_true", help="skip the HTML edition of the book")
    s.add_argument("--executed", type=Path, default=None,
                   help="folder of executed notebooks to render (default: make book's cache)")
    g = sub.add_parser("grade", help="grade a folder of submitted notebooks")
    g.add_argument("submissions", type=Path)
    g.add_argument("--course", type=Path, default=ROOT / "_build" / "course")
    g.add_argument("--profile", default="smoke", choices=["smoke", "cpu", "colab", "gpu"])
    g.add_argument("--jobs", type=int, default=1, help="notebooks graded at once")
    g.add_argument("--timeout", type=float, default=600, help="seconds one notebook may run (default 600)")
    g.add_argument("--table", type=Path, default=None, help="CSV to write (default SUBMISSIONS/scores.csv)")
    args = parser.parse_args(argv)
    if args.command == "student":
        stems = build_student_edition(args.out)
        print(f"student edition of {len(stems)} chapters in {args.out / 'student'}; autograders in "
              f"{args.out / 'autograder'}")
        if not args.no_html:
            build_student_book(args.out, args.executed.resolve() if args.executed else None)
            print(f"the book without solutions: {args.out.resolve() / 'html' / 'index.html'}")
        return 0
    try:
        rows = grade(args.submissions, args.course, args.profile, args.jobs, args.timeout)
    except FileNotFoundError as error:
        print(f"make grade: {error}", file=sys.stderr)
        return 2
    table = args.table or args.submissions / "scores.csv"
    write_table(rows, table)
    for row in rows:
        print(f"{row['submission']:40s} {row['chapter'] or '?':24s} {row['total']:g} / {row['possible']:g}  "
              f"{row['status']}: {row['reason']}"[:200])
    print(f"score table: {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
