"""tools/gpu_check.py: the one command that checks a GPU (README, "Checking a GPU").

Nothing here needs a GPU: the dry run, the refusal without CUDA, the plan, the report writer, the
reading of executed notebooks and of pytest's output, and three tiny notebooks run the way the
check runs the chapters (papermill, its own kernelspec, a budget that kills what overruns it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from importlib import metadata

import nbformat
import pytest
import torch
from packaging.requirements import Requirement

from conftest import ROOT, chapters as toc_chapters
from neuralode import ledger

spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
spec.loader.exec_module(gpu_check)

TOOL = [sys.executable, str(ROOT / "tools" / "gpu_check.py")]
# The chapters that put their work on node.default_device() (read from their sources by the tool): a
# chapter that starts or stops using the GPU must show up here, so that the rule is seen to follow it.
GPU_CHAPTERS = {"01_resnets_are_euler", "02_solving_odes", "04_odenet_classifier", "06_ffjord", "10_flow_matching"}


def tool(*args, timeout=120):
    return subprocess.run([*TOOL, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# ---------------------------------------------------------------------------------------- the plan
def test_the_plan_runs_every_toc_notebook_in_smoke_and_the_gpu_chapters_in_colab_too():
    runs = gpu_check.plan(ROOT)
    smoke = [r.path for r in runs if r.profile == "smoke"]
    assert smoke == toc_chapters(), "the smoke runs must be exactly _toc.yml's notebooks, in its order"
    colab = {r.name for r in runs if r.profile == "colab"}
    # These four put their work on node.default_device(); the others pin the CPU (chapter 7 but in
    # its gpu profile). A chapter that starts or stops using the GPU changes this set on purpose.
    assert colab == GPU_CHAPTERS
    assert [r.profile for r in runs[:len(colab)]] == ["colab"] * len(colab), "the long colab runs start first"
    assert {r.profile for r in runs} == {"smoke", "colab"}


def test_a_chapter_uses_the_gpu_only_when_its_code_assigns_the_default_device():
    def nb(*cells):
        return {"cells": [{"cell_type": kind, "source": src} for kind, src in cells]}

    assert gpu_check.uses_gpu(nb(("code", "x = 1\ndevice = node.default_device()  # here\n")))
    assert gpu_check.uses_gpu(nb(("code", ["import torch\n", "DEVICE = node.default_device()"])))
    assert not gpu_check.uses_gpu(nb(("code", 'DEVICE = node.default_device() if PROFILE == "gpu" else cpu')))
    assert not gpu_check.uses_gpu(nb(("markdown", "device = node.default_device()")))
    assert not gpu_check.uses_gpu(nb(("code", "print(node.default_device())")))


# ---------------------------------------------------------------------------- the command line
def test_the_dry_run_needs_no_gpu_prints_the_plan_and_writes_a_skeleton_with_every_chapter(tmp_path):
    out = tmp_path / "gpu" / "report.md"
    done = tool("--dry-run", "--out", str(out), "--jobs", "3", "--budget", "200")
    assert done.returncode == 0, done.stderr
    assert gpu_check.tests_command() in done.stdout
    runs = gpu_check.plan(ROOT)
    for run in runs:
        cap = 200 if run.profile == "colab" else gpu_check.SMOKE_SHARE * 200
        assert f"{run.key:40s} profile {run.profile:6s} timeout {cap:4.0f} s" in done.stdout
    text = out.read_text()
    for run in runs:
        assert f"| {run.name} | {run.profile} | not run (dry run) |" in text, run.key
    report = json.loads(out.with_suffix(".json").read_text())
    assert sorted((c["name"], c["profile"]) for c in report["chapters"]) == sorted((r.name, r.profile) for r in runs)
    assert {c["status"] for c in report["chapters"]} == {"not run (dry run)"}
    assert report["tests"]["status"] == "not run (dry run)" and report["budget_s"] == 200


def test_without_a_gpu_it_refuses_and_says_why(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal cannot be seen here")
    out = tmp_path / "report.md"
    done = tool("--out", str(out))
    assert done.returncode == 2
    assert "CUDA is not available" in done.stderr and "--dry-run" in done.stderr
    assert not out.exists(), "nothing ran, so no report"


def test_a_wheels_folder_that_lacks_packages_stops_the_dry_run_and_names_them(tmp_path):
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "papermill-2.7.0-py3-none-any.whl").write_bytes(b"")  # present, by name
    done = tool("--dry-run", "--wheels", str(tmp_path / "wheels"), "--out", str(tmp_path / "r.md"))
    assert done.returncode == 2
    assert "has no wheel for: nbclient, nbformat" in done.stderr and "papermill," not in done.stderr
    done = tool("--dry-run", "--wheels", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.md"))
    assert done.returncode == 2 and "no such folder" in done.stderr and "--fetch-wheels" in done.stderr


@pytest.mark.parametrize("args, message", [(["--jobs", "0"], "--jobs must be 1 or more"),
                                           (["--budget", "5"], "--budget must be at least 30"),
                                           (["--only", "no_such_chapter"], "no notebook of _toc.yml matches")])
def test_bad_arguments_are_refused_naming_the_argument(args, message):
    done = tool("--dry-run", *args)
    assert done.returncode == 2 and message in done.stderr


def test_the_wheel_list_covers_what_papermill_and_the_kernel_need_here():
    """Every dependency of papermill and ipykernel in this environment (debugpy aside: the
    debugger only) has a wheel in the list, and every module the list names is importable here."""
    listed = {gpu_check._norm(d) for d, _ in gpu_check.WHEELS}
    needed, todo = set(), ["papermill", "ipykernel"]
    while todo:
        name = gpu_check._norm(todo.pop())
        if name in needed or name == "debugpy":
            continue
        needed.add(name)
        for req in metadata.requires(name) or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    assert needed - listed == set()
    assert [m for _, m in gpu_check.WHEELS if importlib.util.find_spec(m) is None] == []


# --------------------------------------------------------------------- reading what ran
def _error_output(lines):
    return nbformat.v4.new_output("error", ename="AssertionError", evalue="no",
                                  traceback=[f"\x1b[0;31m{line}\x1b[0m" for line in lines])


def executed_notebook():
    data, meta = ledger.bundle("table1-odenet", "1e-3")       # a text that is also a Python literal
    data2, meta2 = ledger.bundle("bpd-mnist", "1.23 bits/dim | 40 NFE")
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("...", outputs=[
            nbformat.v4.new_output("stream", name="stdout", text="profile: colab, device: cuda\n")]),
        nbformat.v4.new_code_cell("...", outputs=[
            nbformat.v4.new_output("display_data", data=data, metadata=meta),
            nbformat.v4.new_output("stream", name="stdout", text="training\nforward NFE 26 -> **38**\n")]),
        nbformat.v4.new_code_cell("...", outputs=[nbformat.v4.new_output("display_data", data=data2, metadata=meta2)]),
        nbformat.v4.new_code_cell("...", outputs=[_error_output([f"line {i}" for i in range(40)])]),
    ]
    return json.loads(nbformat.writes(nb))


def test_device_nfe_ledger_and_traceback_are_read_from_an_executed_notebook():
    found = gpu_check.summarize(executed_notebook())
    assert found["device"] == "cuda"
    assert found["ledger"] == [("table1-odenet", "1e-3"), ("bpd-mnist", "1.23 bits/dim | 40 NFE")]
    assert found["nfe"] == "forward NFE 26 -> 38"
    assert found["error"] == "\n".join(f"line {i}" for i in range(25, 40)), "the last 15 lines, colours removed"


def test_without_printed_lines_the_nfe_comes_from_the_ledger_and_absent_things_say_none():
    nb = executed_notebook()
    nb["cells"] = [nb["cells"][2]]
    assert gpu_check.summarize(nb) == dict(device=None, nfe="bpd-mnist: 1.23 bits/dim | 40 NFE",
                                           ledger=[("bpd-mnist", "1.23 bits/dim | 40 NFE")], error=None)
    assert gpu_check.printed_device({"cells": [{"cell_type": "code", "outputs": [
        {"output_type": "stream", "text": "profile: smoke\n"}]}]}) is None


def test_pytest_output_is_counted_per_test_file_even_when_cut_off():
    log = "\n".join([
        "tests/test_odeint.py::test_a[cuda-dopri5] PASSED                  [ 10%]",
        "tests/test_odeint.py::test_a[cuda-tsit5] FAILED                   [ 20%]",
        "tests/test_odeint.py::test_b[cuda] SKIPPED (needs x)              [ 30%]",
        "tests/test_nets.py::test_c[cuda] PASSED                           [ 40%]",
        "tests/test_nets.py::test_d[cuda] XFAIL (known)                    [ 50%]",
        "=========================== short test summary info ============================",
        "FAILED tests/test_odeint.py::test_a[cuda-tsit5] - AssertionError: off by 1e-3",
        "ERROR tests/test_ledger.py - ModuleNotFoundError: No module named 'myst_nb'",
    ])
    parsed = gpu_check.parse_pytest(log)
    assert parsed["groups"] == {
        "tests/test_ledger.py": dict(passed=0, failed=0, skipped=0, errors=1),
        "tests/test_nets.py": dict(passed=1, failed=0, skipped=1, errors=0),
        "tests/test_odeint.py": dict(passed=1, failed=1, skipped=1, errors=0)}
    assert parsed["failures"] == log.splitlines()[-2:]
    assert gpu_check.parse_pytest(log.split("=====")[0])["groups"]["tests/test_odeint.py"]["failed"] == 1


# ---------------------------------------------------------------------------------- the report
def sample_report():
    runs = [gpu_check.Run(name, profile, ROOT) for name, profile in
            [("04_odenet_classifier", "colab"), ("01_resnets_are_euler", "smoke"), ("04_odenet_classifier", "smoke"),
             ("05_change_of_variables", "smoke")]]
    report = gpu_check.new_report(runs, 270)
    report["machine"] = dict(gpu="NVIDIA H200", cuda="12.8", torch="2.11.0", python="3.12.3", cpus=16)
    report.update(started="2026-12-04 10:00:00", wall_s=241.0, result="FAILED (2 chapter runs not ok)")
    report["tests"] = dict(command=gpu_check.tests_command(), status="failed", wall_s=52.0,
                           groups={"tests/test_odeint.py": dict(passed=40, failed=1, skipped=0, errors=0)},
                           failures=["FAILED tests/test_odeint.py::test_a[cuda] - AssertionError: a | b"],
                           tail="E  boom")
    ok = dict(status="ok", wall_s=31.4, device="cuda", nfe="function evaluations per forward solve: 26",
              ledger=[("table1-odenet", "0.42% test error")], error=None)
    report["chapters"][0].update(ok)                                                           # 01 smoke
    report["chapters"][1].update(status="failed", wall_s=12.0, device="cuda", nfe=None, ledger=[],
                                 error="Traceback ...\nAssertionError: the ODE-Net beats the ResNet")  # 04 smoke
    report["chapters"][2].update(status="timeout", wall_s=265.0, device="cuda", nfe=None, ledger=[],
                                 error="killed after 265 s (its timeout)")                      # 04 colab
    return report                                                                   # 05 smoke: not run


def test_the_report_lists_rows_in_book_order_and_shows_failures_timeouts_and_ledger_rows():
    text = gpu_check.render_markdown(sample_report())
    assert "Machine: NVIDIA H200 (CUDA 12.8), torch 2.11.0, Python 3.12.3, 16 CPU cores" in text
    assert "result: **FAILED (2 chapter runs not ok)**" in text
    assert "| tests/test_odeint.py | 40 | 1 | 0 | 0 |" in text
    assert "- FAILED tests/test_odeint.py::test_a[cuda] - AssertionError: a \\| b" in text
    rows = [line for line in text.splitlines() if line.startswith("| 0")]
    assert rows == [
        "| 01_resnets_are_euler | smoke | ok | 31 | cuda | function evaluations per forward solve: 26 |",
        "| 04_odenet_classifier | smoke | failed | 12 | cuda | n/a |",
        "| 04_odenet_classifier | colab | timeout | 265 | cuda | n/a |",
        "| 05_change_of_variables | smoke | not run | - | - | - |"]
    ok = text.split("### 01_resnets_are_euler (smoke): ok")[1].split("###")[0]
    assert "- `table1-odenet`: 0.42% test error" in ok
    failed = text.split("### 04_odenet_classifier (smoke): failed")[1].split("###")[0]
    assert "```\nTraceback ...\nAssertionError: the ODE-Net beats the ResNet\n```" in failed
    assert "no ledger rows" in failed
    assert "killed after 265 s (its timeout)" in text.split("### 04_odenet_classifier (colab): timeout")[1]
    assert "### 05_change_of_variables" not in text, "a run that did not happen has no section"


# --------------------------------------------------------------- three notebooks run for real
def _notebook(path, *sources):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_notebooks_run_with_the_checkout_and_our_kernel_and_overruns_are_killed(tmp_path):
    pid_file = tmp_path / "kernel.pid"
    runs = [
        gpu_check.Run("fine", "smoke", _notebook(
            tmp_path / "fine.ipynb",
            "import os, neuralode as node\nprint(f'profile: {os.environ[\"NEURALODE_PROFILE\"]}, device: cpu')",
            "node.ledger.record('demo-row', 'NFE 12, error 1e-3')\nprint('function evaluations: 12')")),
        gpu_check.Run("broken", "smoke", _notebook(tmp_path / "broken.ipynb", "x = 1", "assert x == 2, 'x is not 2'")),
        gpu_check.Run("stuck", "smoke", _notebook(
            tmp_path / "stuck.ipynb",
            f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(600)")),
    ]
    out = tmp_path / "check" / "report.md"
    gpu_check.write_kernelspec(out.parent / "jupyter")
    budget = 40                       # the smoke runs are killed after SMOKE_SHARE * 40 = 24 s
    start = time.monotonic()
    report = gpu_check.execute(runs, gpu_check.new_report(runs, budget), out, gpu_check.child_env(out.parent, None),
                               jobs=3, deadline=start + budget, budget=budget, work=out.parent, with_tests=False)
    took = time.monotonic() - start
    by_name = {c["name"]: c for c in report["chapters"]}
    assert by_name["fine"]["status"] == "ok", by_name["fine"]["error"]
    assert by_name["fine"]["device"] == "cpu" and by_name["fine"]["ledger"] == [("demo-row", "NFE 12, error 1e-3")]
    assert by_name["fine"]["nfe"] == "function evaluations: 12"
    assert by_name["broken"]["status"] == "failed" and "AssertionError: x is not 2" in by_name["broken"]["error"]
    assert by_name["stuck"]["status"] == "timeout" and "killed after" in by_name["stuck"]["error"]
    assert gpu_check.SMOKE_SHARE * budget - 1 <= by_name["stuck"]["wall_s"] and took < budget
    kernel = int(pid_file.read_text())
    assert not os.path.exists(f"/proc/{kernel}") or "zombie" in open(f"/proc/{kernel}/status").read().lower(), \
        "the stuck notebook's kernel outlived the timeout"
    assert report["result"] == "FAILED (2 chapter runs not ok)"
    assert json.loads(out.with_suffix(".json").read_text())["result"] == report["result"]
    assert "| stuck | smoke | timeout |" in out.read_text()
