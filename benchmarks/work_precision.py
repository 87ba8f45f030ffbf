"""Work-precision diagrams: error against function evaluations and against time.

For each adaptive method of neuralode (and torchdiffeq's dopri5 on the same axes) and a ladder
of tolerances rtol = atol = tol, on the non-stiff test problems of ``tests/problems.py`` (Van der
Pol mu = 1, Lotka-Volterra, the two-body orbit, Lorenz on a short span), the error is the largest
relative deviation at 11 output times from scipy's DOP853 at rtol = atol = 1e-13.

Run: ``python benchmarks/work_precision.py [--quick] [--out DIR]``; writes
``work_precision.md``, ``work_precision.json`` and two figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchdiffeq  # noqa: E402

import neuralode as node  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from problems import REFERENCE_PROBLEMS  # noqa: E402

#: Each method's tolerance ladder: a low-order pair at tight tolerances costs ~1e6 steps.
TOLERANCES = {
    "adaptive_heun": [1e-3, 1e-4, 1e-5, 1e-6],
    "bosh3": [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8],
    "dopri5": [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10],
    "tsit5": [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10],
    "torchdiffeq dopri5": [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10],
}


def _solver(label: str):
    if label.startswith("torchdiffeq"):
        def solve(f, y0, t, tol):
            calls = [0]

            def counted(s, y):
                calls[0] += 1
                return f(s, y)

            ys = torchdiffeq.odeint(counted, y0, t, rtol=tol, atol=tol, method=label.split()[-1])
            return ys, calls[0]
    else:
        def solve(f, y0, t, tol):
            ys, stats = node.odeint(f, y0, t, method=label, rtol=tol, atol=tol, return_stats=True,
                                    options={"max_num_steps": 10**6})
            return ys, stats.nfe
    return solve


def study(problems=REFERENCE_PROBLEMS, methods=tuple(TOLERANCES), repeats: int = 3, quick: bool = False):
    """Rows of (problem, method, tol, error, nfe, seconds). ``quick`` keeps every other tolerance."""
    torch.set_num_threads(1)
    rows = []
    for problem in problems:
        t = np.linspace(0.0, problem.t1, 11)
        ref = problem.reference(t)
        scale = np.abs(ref).max(axis=0)
        for label in methods:
            solve = _solver(label)
            tolerances = TOLERANCES[label][::2] if quick else TOLERANCES[label]
            for tol in tolerances:
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    ys, nfe = solve(problem.f, problem.initial(), torch.from_numpy(t), tol)
                    times.append(time.perf_counter() - start)
                error = float((np.abs(ys.numpy() - ref).max(axis=0) / scale).max())
                rows.append({"problem": problem.name, "method": label, "tol": tol, "error": error,
                             "nfe": nfe, "seconds": statistics.median(times)})
    return rows


def plot(rows, x: str, path: Path | None = None):
    """One panel per problem: error against ``x`` ("nfe" or "seconds"), one line per method."""
    problems = list(dict.fromkeys(r["problem"] for r in rows))
    fig, axes = plt.subplots(1, len(problems), figsize=(4 * len(problems), 3.6), squeeze=False)
    for ax, name in zip(axes[0], problems):
        for label in dict.fromkeys(r["method"] for r in rows):
            pts = [(r[x], r["error"]) for r in rows if r["problem"] == name and r["method"] == label]
            style = "k--" if label.startswith("torchdiffeq") else "-"
            ax.loglog(*zip(*pts), style, marker="o", ms=3, label=label)
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("function evaluations" if x == "nfe" else "seconds (median)")
        ax.set_ylabel("max relative error vs DOP853")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Work-precision: error against " + ("function evaluations" if x == "nfe" else "time"))
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def to_markdown(rows) -> str:
    lines = ["| problem | method | tol | error | NFE | ms |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['problem']} | {r['method']} | {r['tol']:.0e} | {r['error']:.2e} | {r['nfe']} | "
                     f"{1e3 * r['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every other tolerance, one repeat")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rows = study(repeats=1 if args.quick else 3, quick=args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "work_precision.json").write_text(json.dumps(rows, indent=2))
    (args.out / "work_precision.md").write_text(to_markdown(rows) + "\n")
    plot(rows, "nfe", args.out / "work_precision_nfe.png")
    plot(rows, "seconds", args.out / "work_precision_time.png")
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
