"""The course edition: student notebooks without solutions, and an autograder, built with otter-grader.

Each chapter of the book is the single source of its exercises. An exercise there is

    ```{exercise} ...          (markdown, with :label: chN-ex-name)
    given cells                (code the exercise sets up, optional)
    ```{solution-start} ...    (markdown)
    solution cells             (code tagged "solution", and markdown)
    ```{solution-end}          (markdown)
    check cells                (code tagged "check": they call neuralode.exercises)

``student`` turns every chapter into an otter-assign "master" notebook (one otter question per
exercise: the exercise is the prompt, the solution cells its solution block, the check cells its
tests), runs ``otter assign``, and collects

    OUT/student/NN_chapter.ipynb        to hand out: solutions replaced by prompts, checks kept
    OUT/autograder/NN_chapter.zip       otter's autograder for the chapter
    OUT/solutions/NN_chapter.ipynb      otter's solution notebook (the book's code)

``grade`` runs ``otter run`` (otter's grader without Docker) on every submitted notebook in a
folder and writes a score table. Submissions execute in the ``smoke`` profile unless told
otherwise: the checks grade the exercises, not the size of the chapter's experiments.

    python tools/course.py student [--out _build/course]
    python tools/course.py grade SUBMISSIONS_DIR [--course _build/course] [--profile smoke]
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHAPTER_KEY = "neuralode_chapter"  # notebook metadata naming the chapter a notebook belongs to


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
    """What a student sees instead of a solution cell: its top-level names with ``...`` for values.

    ``def f(a, b): <body>`` becomes ``def f(a, b):`` with its docstring and ``...``; ``x = <expr>``
    becomes ``x = ...``; other statements are dropped.
    """
    lines = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            stub = ast.FunctionDef(name=node.name, args=node.args, body=[], decorator_list=node.decorator_list,
                                   returns=node.returns, type_params=[])
            doc = ast.get_docstring(node, clean=False)
            stub.body = ([ast.Expr(ast.Constant(doc))] if doc else []) + [ast.Expr(ast.Constant(...))]
            lines.append(ast.unparse(ast.fix_missing_locations(stub)).replace("\n    ...", "\n    ...  # your code"))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            lines.append(" = ".join(ast.unparse(t) for t in targets) + " = ...  # your code")
    return "\n\n".join(lines) if lines else "# your code"


def _solution_cell(cell):
    """A solution code cell in otter's syntax: the prompt as a string, the solution between markers."""
    prompt = _prompt(cell.source).replace('"""', "'''")
    source = f'""" # BEGIN PROMPT\n{prompt}\n""" # END PROMPT\n# BEGIN SOLUTION NO PROMPT\n{cell.source}\n# END SOLUTION'
    return nbformat.v4.new_code_cell(source, metadata={"tags": ["solution"]})


def _test_cell(check_cell, index: int):
    """One of the check cells as an otter exception-based test: it runs in a copy of the notebook's
    globals and passes when it raises nothing."""
    name = f"test_check_{index}"
    source = (f"def {name}(env):\n    exec(compile({check_cell.source!r}, 'check cell', 'exec'), dict(env))\n\n"
              f"{name}(globals())")
    return nbformat.v4.new_code_cell(source)


def master_notebook(chapter: Path) -> nbformat.NotebookNode:
    """The chapter as an otter-assign master notebook (otter's v1 format)."""
    nb = nbformat.read(chapter, as_version=4)
    raw = nbformat.v4.new_raw_cell
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
        checks = []
        while i < len(nb.cells) and "check" in nb.cells[i].metadata.get("tags", []):
            checks.append(nb.cells[i])
            i += 1
        question = {"name": label, "points": 1, "check_cell": False}
        if not checks:
            question["manual"] = True
        cells += [raw("# BEGIN QUESTION\n" + yaml.safe_dump(question, sort_keys=False)), cell, *given,
                  raw("# BEGIN SOLUTION")]
        cells += [_solution_cell(c) if c.cell_type == "code" else c for c in solution]
        cells.append(raw("# END SOLUTION"))
        if checks:
            cells.append(raw("# BEGIN TESTS"))
            cells += [_test_cell(c, k) for k, c in enumerate(checks)]
            cells.append(raw("# END TESTS"))
        cells.append(raw("# END QUESTION"))
        cells += checks  # the checks stay in the student's notebook, for the student to run
        n_questions += 1
    if not n_questions:
        raise ValueError(f"{chapter.name} has no exercises")
    nb.cells = cells
    nb.metadata[CHAPTER_KEY] = chapter.stem
    return nb


# ------------------------------------------------------------------------------------ otter's tools
def _otter(*args: str, cwd: Path, env=None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "otter", *args], cwd=cwd, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"otter {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def build_student_edition(out: Path) -> list[str]:
    """Write OUT/student, OUT/autograder and OUT/solutions for every chapter; return the chapter stems."""
    if out.exists():
        shutil.rmtree(out)
    for sub in ("student", "autograder", "solutions", "masters"):
        (out / sub).mkdir(parents=True)
    stems = []
    for chapter in chapters():
        master = out / "masters" / chapter.name
        nbformat.write(master_notebook(chapter), master)
        with tempfile.TemporaryDirectory() as tmp:
            dist = Path(tmp) / "dist"
            _otter("assign", "-v", str(master), str(dist), cwd=out / "masters")
            student = dist / "student" / chapter.name
            nb = nbformat.read(student, as_version=4)
            nb.metadata[CHAPTER_KEY] = chapter.stem
            nbformat.write(nb, out / "student" / chapter.name)
            shutil.copy(dist / "autograder" / chapter.name, out / "solutions" / chapter.name)
            zips = sorted((dist / "autograder").glob("*.zip"))
            if len(zips) != 1:
                raise RuntimeError(f"otter assign made {len(zips)} autograder zips for {chapter.name}")
            shutil.copy(zips[0], out / "autograder" / f"{chapter.stem}.zip")
        stems.append(chapter.stem)
    return stems


def grade_one(path: Path, course: Path, profile: str = "smoke") -> dict:
    """Run otter's grader on one submitted notebook: ``{question: score, ..., "total", "possible"}``."""
    stem = nbformat.read(path, as_version=4).metadata.get(CHAPTER_KEY)
    autograder = course / "autograder" / f"{stem}.zip"
    if not autograder.exists():
        raise ValueError(f"{path}: no autograder for chapter {stem!r} in {course / 'autograder'}; grade "
                         "notebooks of the student edition that `make student` wrote.")
    env = dict(os.environ, NEURALODE_PROFILE=profile)
    with tempfile.TemporaryDirectory() as tmp:
        _otter("run", "-a", str(autograder), "-o", tmp, "--no-logo", str(path.resolve()), cwd=Path(tmp), env=env)
        results = json.loads((Path(tmp) / "results.json").read_text(encoding="utf-8"))
    graded = [test for test in results["tests"] if test.get("max_score") is not None]  # not the summary
    scores = {test["name"]: float(test["score"]) for test in graded}
    return {"chapter": stem, **scores, "total": sum(scores.values()),
            "possible": sum(float(test["max_score"]) for test in graded)}


def grade(submissions: Path, course: Path, profile: str = "smoke", jobs: int = 1) -> list[dict]:
    """Grade every ``*.ipynb`` under ``submissions`` (``jobs`` at a time); one row per notebook."""
    paths = sorted(p for p in submissions.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda p: grade_one(p, course, profile), paths))
    return [{"submission": str(p.relative_to(submissions)), **r} for p, r in zip(paths, results)]


def write_table(rows: list[dict], path: Path) -> None:
    fields = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("student", help="write the student edition and the autograders")
    s.add_argument("--out", type=Path, default=ROOT / "_build" / "course")
    g = sub.add_parser("grade", help="grade a folder of submitted notebooks")
    g.add_argument("submissions", type=Path)
    g.add_argument("--course", type=Path, default=ROOT / "_build" / "course")
    g.add_argument("--profile", default="smoke", choices=["smoke", "cpu", "gpu"])
    g.add_argument("--jobs", type=int, default=1, help="notebooks graded at once")
    g.add_argument("--table", type=Path, default=None, help="CSV to write (default SUBMISSIONS/scores.csv)")
    args = parser.parse_args(argv)
    if args.command == "student":
        stems = build_student_edition(args.out)
        print(f"student edition of {len(stems)} chapters in {args.out / 'student'}; autograders in "
              f"{args.out / 'autograder'}")
        return 0
    rows = grade(args.submissions, args.course, args.profile, args.jobs)
    table = args.table or args.submissions / "scores.csv"
    write_table(rows, table)
    for row in rows:
        print(f"{row['submission']:40s} {row['chapter']:28s} {row['total']:g} / {row['possible']:g}")
    print(f"score table: {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
