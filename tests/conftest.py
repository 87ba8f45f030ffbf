"""Shared fixtures: the book's table of contents, one smoke execution per chapter, one strict build.

The notebook tests are arranged so that each chapter executes as few times as possible per run:

1. ``smoke`` runs every chapter listed in ``_toc.yml`` once with papermill (``-p PROFILE smoke``,
   kernel ``python3`` of this interpreter) into ``_build/smoke/<name>.ipynb``. papermill fails on
   the first failing cell.
2. A second, independent run of each chapter starts alongside the first (on the other core; the
   appendix, which launches multi-process training, afterwards): ``tests/test_notebooks.py``
   checks that its cells marked ``# NBVAL_CHECK_OUTPUT`` print what they printed in the first
   run (nbval-lax's determinism check, without a third execution).
3. ``book_build`` builds the book with execution *off* from a copy of the sources in which
   ``book/*.ipynb`` are the smoke-executed notebooks, with ``-W -n --keep-going``: it renders and
   checks every warning without executing anything again.
4. ``tests/test_checks_bite.py`` runs each chapter once more per planted bug (cut after the check
   that must catch it), through :func:`papermill` with a ``sitecustomize`` on ``PYTHONPATH``.

The fixtures are session-scoped and cached, so the order in which pytest runs the tests does not
matter: whichever test needs a chapter's smoke run or the build first triggers it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "_build"
SMOKE_DIR = BUILD / "smoke"
TEST_BOOK_DIR = BUILD / "test-book"  # source copy; its HTML lands in TEST_BOOK_DIR/_build/html

# Per-cell limit for smoke runs: a smoke chapter takes well under a minute, so a cell that runs
# this long is hung, and failing it quickly keeps CI inside its budget.
SMOKE_CELL_TIMEOUT_S = 300


# ---------------------------------------------------------------------------- table of contents
def load_yaml(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _toc_entries(node) -> list[str]:
    """Every ``file:`` entry of a jb-book table of contents, in reading order."""
    found = []
    if isinstance(node, dict):
        if "file" in node:
            found.append(node["file"])
        for key in ("parts", "chapters", "sections"):
            for child in node.get(key, []) or []:
                found.extend(_toc_entries(child))
    return found


def toc_files() -> list[str]:
    """The root and every file of ``_toc.yml``, as written there (no suffix)."""
    toc = load_yaml(ROOT / "_toc.yml")
    return [toc["root"], *_toc_entries(toc)]


def resolve_toc_file(entry: str) -> Path | None:
    """The source file a toc entry names (``.md`` or ``.ipynb``), or None if none exists."""
    path = ROOT / entry
    if path.suffix in (".md", ".ipynb") and path.is_file():
        return path
    matches = [p for p in (path.with_suffix(".md"), path.with_suffix(".ipynb")) if p.is_file()]
    return matches[0] if len(matches) == 1 else None


def chapters() -> list[Path]:
    """The notebooks the book executes, in the order of ``_toc.yml``."""
    paths = (resolve_toc_file(e) for e in toc_files())
    return [p for p in paths if p is not None and p.suffix == ".ipynb"]


def committed_notebooks() -> list[Path]:
    """Every notebook under book/ (chapters or not), as stored in the repository."""
    return sorted(
        p for p in (ROOT / "book").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts
    )


def pytest_generate_tests(metafunc):
    # `chapter`: each chapter of the toc; `notebook`: each notebook committed under book/.
    if "chapter" in metafunc.fixturenames:
        found = chapters()
        metafunc.parametrize("chapter", found, ids=[p.stem for p in found])
    if "notebook" in metafunc.fixturenames:
        found = committed_notebooks()
        metafunc.parametrize("notebook", found, ids=[p.stem for p in found])


# ------------------------------------------------------------------------ running the notebooks
def notebook_env() -> dict[str, str]:
    """Environment for kernels: smoke profile, this interpreter's kernelspec, inline figures."""
    env = dict(os.environ)
    env["NEURALODE_PROFILE"] = "smoke"
    # The kernelspec `python3` of this environment comes first, so no user-level kernelspec can
    # send the notebooks to another interpreter.
    here = str(Path(sys.prefix) / "share" / "jupyter")
    env["JUPYTER_PATH"] = os.pathsep.join(p for p in (here, env.get("JUPYTER_PATH")) if p)
    # A non-inline backend inherited from the caller would drop every figure from the book.
    env.pop("MPLBACKEND", None)
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    env.setdefault("PYTHONHASHSEED", "0")
    return env


@dataclasses.dataclass
class Run:
    """The outcome of one subprocess: its command, exit status and combined output."""

    args: list[str]
    returncode: int
    log: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def tail(self, n: int = 6000) -> str:
        return self.log[-n:]

    def warnings(self) -> list[str]:
        """Sphinx's WARNING and ERROR lines, which -W turns into a failed build."""
        return [line for line in self.log.splitlines() if re.search(r"\b(WARNING|ERROR)\b", line)]


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run(args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> Run:
    """Run a command in :func:`notebook_env`, with ``env``'s variables added on top."""
    proc = subprocess.run(
        args, cwd=cwd, env={**notebook_env(), **(env or {})}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
    )
    return Run(args=[str(a) for a in args], returncode=proc.returncode, log=ANSI.sub("", proc.stdout))


def _papermill_command(notebook: Path, out: Path, workdir: Path) -> list[str]:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    shutil.rmtree(workdir, ignore_errors=True)  # files a chapter writes stay out of book/
    workdir.mkdir(parents=True)
    return [
        sys.executable, "-m", "papermill", str(notebook), str(out),
        "-p", "PROFILE", "smoke", "-k", "python3", "--cwd", str(workdir),
        "--execution-timeout", str(SMOKE_CELL_TIMEOUT_S), "--no-progress-bar",
    ]


def papermill(notebook: Path, out: Path, workdir: Path, *, env: dict[str, str] | None = None) -> Run:
    """Execute ``notebook`` into ``out`` in the smoke profile (kernel ``python3``, cwd ``workdir``)."""
    return run(_papermill_command(notebook, out, workdir), env=env)


class _Background:
    """A papermill run started in the background; ``result()`` waits for it."""

    def __init__(self, args: list[str], log: Path):
        self.args, self.log = args, log
        with open(log, "w", encoding="utf-8") as sink:
            self.proc = subprocess.Popen(args, env=notebook_env(), stdout=sink, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, text=True)

    def result(self) -> Run:
        code = self.proc.wait()
        return Run(args=[str(a) for a in self.args], returncode=code,
                   log=ANSI.sub("", self.log.read_text(encoding="utf-8", errors="replace")))


class SmokeRuns:
    """Executes each chapter at most once per session (papermill, smoke profile), and once more, at
    the same time on the other core, for the reproducibility check (:meth:`replay`)."""

    # Chapters whose second run is not started alongside the first: the appendix launches
    # multi-process training with timeouts of its own, which a doubled load could trip.
    SEQUENTIAL_REPLAY = {"appendix_distributed"}

    def __init__(self) -> None:
        self._done: dict[Path, Run] = {}
        self._replays: dict[Path, object] = {}
        SMOKE_DIR.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def output_path(chapter: Path) -> Path:
        return SMOKE_DIR / chapter.name

    @staticmethod
    def replay_path(chapter: Path) -> Path:
        return SMOKE_DIR / "replay" / chapter.name

    def _replay_args(self, chapter: Path) -> list[str]:
        return _papermill_command(chapter, self.replay_path(chapter), SMOKE_DIR / "cwd-replay" / chapter.stem)

    def __call__(self, chapter: Path) -> Run:
        if chapter not in self._done:
            if chapter.stem not in self.SEQUENTIAL_REPLAY:
                log = SMOKE_DIR / "replay" / f"{chapter.stem}.log"
                self._replays[chapter] = _Background(self._replay_args(chapter), log)
            self._done[chapter] = papermill(chapter, self.output_path(chapter), SMOKE_DIR / "cwd" / chapter.stem)
        return self._done[chapter]

    def replay(self, chapter: Path) -> Run:
        """A second, independent smoke run of ``chapter`` (into :meth:`replay_path`)."""
        self(chapter)
        pending = self._replays.get(chapter)
        if isinstance(pending, _Background):
            self._replays[chapter] = pending.result()
        elif pending is None:
            self._replays[chapter] = run(self._replay_args(chapter))
        return self._replays[chapter]


@pytest.fixture(scope="session")
def smoke() -> SmokeRuns:
    return SmokeRuns()


# ----------------------------------------------------------------------------- the strict build
@dataclasses.dataclass
class BookBuild:
    run: Run
    html: Path  # the build's HTML folder (may be missing if the build failed early)
    missing_chapters: list[str]  # chapters whose smoke run failed (rendered from their partial output)


def course_tools():
    """tools/course.py as a module (it also copies the book's sources for a build)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("course", ROOT / "tools" / "course.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _test_config() -> dict:
    config = load_yaml(ROOT / "_config.yml")
    # Everything was executed by the smoke runs: render their outputs, execute nothing again.
    config.setdefault("execute", {})["execute_notebooks"] = "off"
    return config


@pytest.fixture(scope="session")
def book_build(smoke: SmokeRuns) -> BookBuild:
    """The book built like CI should: smoke outputs, execution off, -W -n --keep-going."""
    failed = [c.stem for c in chapters() if not smoke(c).ok]

    course_tools().copy_book_sources(TEST_BOOK_DIR, _test_config())
    for chapter in chapters():
        executed = SmokeRuns.output_path(chapter)
        if executed.is_file():  # papermill writes its output even when a cell fails
            shutil.copy2(executed, TEST_BOOK_DIR / chapter.relative_to(ROOT))

    result = run([
        str(Path(sys.executable).parent / "jupyter-book"), "build", str(TEST_BOOK_DIR),
        "-W", "-n", "--keep-going",
    ])
    if result.returncode == 0:  # as make book does: the download button's notebooks carry the library
        downloads = run([sys.executable, str(ROOT / "tools" / "downloads.py"), "--html", str(TEST_BOOK_DIR / "_build" / "html")])
        assert downloads.ok, f"tools/downloads.py failed on the test build:\n{downloads.tail()}"
    return BookBuild(run=result, html=TEST_BOOK_DIR / "_build" / "html", missing_chapters=failed)
