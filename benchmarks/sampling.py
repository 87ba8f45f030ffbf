"""Few-step sampling of a flow-matching field: neuralode's odeint against a bare loop and torchdiffeq.

Sampling a trained flow-matching model is a fixed-step solve of ``dx/dt = v(t, x)`` from noise at
``t = 0`` to data at ``t = 1`` in a handful of steps, where a solver's per-solve overhead (input
checks, grid construction, bookkeeping) is not hidden behind many evaluations (issue 24; a known
torchdiffeq complaint). Cases: batch 256 and 4096, methods euler, midpoint and rk4, 2 to 32 steps:

  (a) ``bare``: a hand-written loop with the same stages and weights, times from one ``linspace``;
  (b) ``neuralode``: ``odeint(v, x0, [0, 1], method=..., options={"step_size": 1/k})``, which checks
      its arguments, the field's outputs (shape, dtype, device) and, once per solve, that the
      solution is finite;
  (c) ``torchdiffeq``: the same call to ``torchdiffeq.odeint``.

rk4 is the 3/8 rule throughout, because that is what torchdiffeq's ``"rk4"`` is (neuralode's
``"rk4_38"``; neuralode's ``"rk4"`` is the classical one, at the same cost per step). dopri5 at
rtol = atol = 1e-5 in both libraries is the adaptive reference: its NFE and time.

The field: an MLP ``v(t, x)`` on ``[x, t]`` (2 -> 64 -> 64 -> 64 -> 2, SiLU), trained for a few
hundred steps by conditional flow matching (linear path, independent coupling) on 8 Gaussians with a
hand-written loop; the timing does not depend on the training, but the reference solve's NFE and the
methods' errors do. Each method's error is the largest deviation of its samples from a float64
dopri5 solve at rtol = atol = 1e-10. The three implementations must agree (float64: 1e-12 relative;
float32: 1e-5), so a wrong floor cannot be reported.

Timing as in ``speed.py``: one process, one thread, the implementations interleaved, medians over
``--repeats``; each timed sample runs the solve enough times to last about 5 ms (on a GPU,
``--device cuda``, synchronised at the end of each sample). Writes ``sampling.json``,
``sampling.md`` and ``sampling.png`` into ``--out``. On the CPU at batch 4096 the times depend on
the process's heap history (glibc's mmap and trim thresholds decide whether the field's 1 MB
activations page-fault): the same solve has measured up to 2x apart in two processes, so compare
the implementations within one run, never across runs.

Run: ``python benchmarks/sampling.py [--quick] [--repeats N] [--device cpu] [--out DIR]``;
``--profile`` prints where neuralode's time goes in a 2-step euler solve (cProfile) instead.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import platform
import pstats
import statistics
import time
from pathlib import Path
from typing import Optional

import torch
import torchdiffeq
from torch import Tensor, nn

import neuralode as node

BATCHES = (256, 4096)
STEPS = (2, 4, 8, 16, 32)
METHODS = {"euler": ("euler", "euler"), "midpoint": ("midpoint", "midpoint"), "rk4": ("rk4_38", "rk4")}
IMPLEMENTATIONS = ("bare", "neuralode", "torchdiffeq")
REFERENCE_TOL = 1e-5


class Field(nn.Module):
    """A flow-matching velocity field ``v(t, x)``: an MLP on ``[x, t]``; ``t`` a 0-d tensor."""

    def __init__(self, dim: int = 2, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.net(torch.cat([x, t.to(x.dtype).expand(x.shape[0], 1)], dim=1))


def train_field(steps: int = 400, seed: int = 0) -> Field:
    """Conditional flow matching on 8 Gaussians: regress ``v(t, x_t)`` on ``x1 - x0`` along
    ``x_t = (1 - t) x0 + t x1``, ``x0 ~ N(0, I)`` (Lipman et al. 2023; Liu et al. 2023)."""
    torch.manual_seed(seed)
    field = Field()
    data = node.data.toy_density("8gaussians", 20_000, seed=seed)
    optimizer = torch.optim.Adam(field.parameters(), lr=2e-3)
    for _ in range(steps):
        x1 = data[torch.randint(len(data), (256,))]
        x0, t = torch.randn_like(x1), torch.rand(len(x1), 1)
        target = x1 - x0
        loss = (field.net(torch.cat([(1 - t) * x0 + t * x1, t], dim=1)) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return field.requires_grad_(False)


# The bare loops: the methods' stages and weights, nothing else. Each returns the final state.

def bare_euler(v, x: Tensor, k: int) -> Tensor:
    h, ts = 1.0 / k, torch.linspace(0.0, 1.0, k + 1, dtype=x.dtype, device=x.device)
    for i in range(k):
        x = torch.add(x, v(ts[i], x), alpha=h)
    return x


def bare_midpoint(v, x: Tensor, k: int) -> Tensor:
    h, ts = 1.0 / k, torch.linspace(0.0, 1.0, 2 * k + 1, dtype=x.dtype, device=x.device)
    for i in range(k):
        k1 = v(ts[2 * i], x)
        x = torch.add(x, v(ts[2 * i + 1], torch.add(x, k1, alpha=h / 2)), alpha=h)
    return x


def bare_rk4(v, x: Tensor, k: int) -> Tensor:
    """Kutta's 3/8 rule (torchdiffeq's ``rk4``)."""
    h, ts = 1.0 / k, torch.linspace(0.0, 1.0, 3 * k + 1, dtype=x.dtype, device=x.device)
    for i in range(k):
        k1 = v(ts[3 * i], x)
        k2 = v(ts[3 * i + 1], torch.add(x, k1, alpha=h / 3))
        k3 = v(ts[3 * i + 2], torch.add(x, k2 - k1 / 3, alpha=h))
        k4 = v(ts[3 * i + 3], torch.add(x, k1 - k2 + k3, alpha=h))
        x = torch.add(x, k1 + 3 * (k2 + k3) + k4, alpha=h / 8)
    return x


BARE = {"euler": bare_euler, "midpoint": bare_midpoint, "rk4": bare_rk4}


def solver(impl: str, method: str, k: int):
    """``run(v, x0) -> x1`` for one implementation, method and number of steps."""
    if impl == "bare":
        return lambda v, x: BARE[method](v, x, k)
    ours, theirs = METHODS[method]
    t = torch.tensor([0.0, 1.0])  # neuralode keeps time on the host: a CPU t saves it a copy from the device
    if impl == "neuralode":
        return lambda v, x: node.odeint(v, x, t, method=ours, options={"step_size": 1.0 / k})[-1]
    return lambda v, x: torchdiffeq.odeint(v, x, t.to(x), method=theirs, options={"step_size": 1.0 / k})[-1]


def copy(field: Field, dtype: torch.dtype) -> Field:
    """The same field in another dtype (on the same device), without gradients."""
    other = Field().to(dtype=dtype, device=next(field.parameters()).device)
    other.load_state_dict(field.state_dict())
    return other.requires_grad_(False)


def check_agreement(field: Field, x0: Tensor) -> None:
    """The three implementations compute the same numbers: float64 to 1e-12, float32 to 1e-5
    (relative to the largest entry), every method and number of steps; raises otherwise."""
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        v, x = copy(field, dtype), x0.to(dtype)
        for method in METHODS:
            for k in STEPS:
                out = {impl: solver(impl, method, k)(v, x) for impl in IMPLEMENTATIONS}
                for impl in ("neuralode", "torchdiffeq"):
                    gap = float((out[impl] - out["bare"]).abs().max() / out["bare"].abs().max())
                    if not gap <= tol:
                        raise AssertionError(f"{impl} {method} with {k} steps differs from the bare loop by "
                                             f"{gap:.3g} relative ({dtype}; allowed {tol:g}): not reporting it")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(runs: dict, repeats: int, device: torch.device) -> dict:
    """Median seconds per call of each ``runs[name]()``, interleaved; each sample repeats the call
    ``number`` times, ``number`` chosen so that the first run's sample lasts about 5 ms."""
    for run in runs.values():  # warm-up
        run()
    _sync(device)
    first = next(iter(runs.values()))
    start = time.perf_counter()
    first()
    _sync(device)
    number = max(1, math.ceil(5e-3 / (time.perf_counter() - start)))
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(number):
                run()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / number)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def measure(repeats: int, steps=STEPS, batches=BATCHES, device: str = "cpu") -> dict:
    torch.set_num_threads(1)
    device = torch.device(device)
    field = train_field().to(device)
    check_agreement(field, torch.randn(64, 2, generator=torch.Generator().manual_seed(1)).to(device))
    reference_field = copy(field, torch.float64)
    rows, references = [], []
    for batch in batches:
        x0 = torch.randn(batch, 2, generator=torch.Generator().manual_seed(2)).to(device)
        exact = node.odeint(reference_field, x0.double(), torch.tensor([0.0, 1.0]), rtol=1e-10, atol=1e-10)[-1]
        for method in METHODS:
            for k in steps:
                runs = {impl: (lambda run=solver(impl, method, k): run(field, x0)) for impl in IMPLEMENTATIONS}
                med = time_interleaved(runs, repeats, device)
                error = float((runs["neuralode"]().double() - exact).abs().max())
                rows.append({"batch": batch, "method": method, "steps": k, "nfe": k * {"euler": 1, "midpoint": 2,
                             "rk4": 4}[method], "error": error, **{f"{impl}_s": med[impl] for impl in IMPLEMENTATIONS},
                             "neuralode_ratio": med["neuralode"] / med["bare"],
                             "torchdiffeq_ratio": med["torchdiffeq"] / med["bare"]})
        # dopri5, the adaptive reference: NFE from each library's own count, time interleaved
        counts, times = {}, torch.tensor([0.0, 1.0])

        def dopri5(lib, x=x0):
            calls = [0]

            def counted(t, y):
                calls[0] += 1
                return field(t, y)

            odeint, t = (node.odeint, times) if lib == "neuralode" else (torchdiffeq.odeint, times.to(x))
            out = odeint(counted, x, t, method="dopri5", rtol=REFERENCE_TOL, atol=REFERENCE_TOL)[-1]
            counts[lib] = calls[0]
            return out

        med = time_interleaved({lib: (lambda lib=lib: dopri5(lib)) for lib in ("neuralode", "torchdiffeq")},
                               repeats, device)
        references.append({"batch": batch, "tol": REFERENCE_TOL, "neuralode_s": med["neuralode"],
                           "torchdiffeq_s": med["torchdiffeq"], "neuralode_nfe": counts["neuralode"],
                           "torchdiffeq_nfe": counts["torchdiffeq"],
                           "error": float((dopri5("neuralode").double() - exact).abs().max())})
    return {"rows": rows, "dopri5": references}


def to_markdown(result: dict) -> str:
    lines = ["| batch | method | steps | NFE | max error | bare (ms) | neuralode (ms) | torchdiffeq (ms) | "
             "neuralode/bare | torchdiffeq/bare |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['batch']} | {r['method']} | {r['steps']} | {r['nfe']} | {r['error']:.1e} | "
                     f"{1e3 * r['bare_s']:.3f} | {1e3 * r['neuralode_s']:.3f} | {1e3 * r['torchdiffeq_s']:.3f} | "
                     f"{r['neuralode_ratio']:.2f} | {r['torchdiffeq_ratio']:.2f} |")
    lines += ["", f"dopri5 at rtol = atol = {REFERENCE_TOL:g}:", "",
              "| batch | NFE neuralode | NFE torchdiffeq | neuralode (ms) | torchdiffeq (ms) | max error |",
              "|---:|---:|---:|---:|---:|---:|"]
    for r in result["dopri5"]:
        lines.append(f"| {r['batch']} | {r['neuralode_nfe']} | {r['torchdiffeq_nfe']} | {1e3 * r['neuralode_s']:.3f} | "
                     f"{1e3 * r['torchdiffeq_s']:.3f} | {r['error']:.1e} |")
    return "\n".join(lines)


def plot(result: dict, path: Optional[Path] = None, device: str = "cpu"):
    """One column per batch size: median time against steps (top), one line per implementation and
    method, dopri5's times as horizontal lines; and the ratio to the bare loop (bottom), the 1.2 target. Saved to ``path`` when one is given; returns the figure."""
    import matplotlib.pyplot as plt

    batches = list(dict.fromkeys(r["batch"] for r in result["rows"]))
    fig, axes = plt.subplots(2, len(batches), figsize=(5.5 * len(batches), 7.5), squeeze=False, sharex=True,
                             gridspec_kw={"height_ratios": (3, 2)})
    colors = dict(zip(METHODS, ("C0", "C1", "C2")))
    styles = {"bare": ":", "neuralode": "-", "torchdiffeq": "--"}
    for col, batch in enumerate(batches):
        top, bottom = axes[0][col], axes[1][col]
        for method in METHODS:
            rows = [r for r in result["rows"] if r["batch"] == batch and r["method"] == method]
            steps = [r["steps"] for r in rows]
            for impl in IMPLEMENTATIONS:
                top.loglog(steps, [1e3 * r[f"{impl}_s"] for r in rows], styles[impl], color=colors[method],
                           marker="o", ms=3, label=f"{method}, {impl}")
                if impl != "bare":
                    bottom.plot(steps, [r[f"{impl}_ratio"] for r in rows], styles[impl], color=colors[method],
                                marker="o", ms=3)
        for ref in (r for r in result["dopri5"] if r["batch"] == batch):
            for lib, style in (("neuralode", "-"), ("torchdiffeq", "--")):
                top.axhline(1e3 * ref[f"{lib}_s"], color="k", ls=style, lw=0.8,
                            label=f"dopri5 {ref['tol']:g}, {lib} ({ref[f'{lib}_nfe']} NFE)")
        bottom.axhline(1.2, color="k", ls=":", lw=0.8)
        bottom.axhline(1.0, color="k", lw=0.5)
        bottom.set_xscale("log", base=2)
        top.set_title(f"batch {batch}")
        top.set_ylabel("ms per sampling solve (median)")
        bottom.set_ylabel("time / bare loop (target 1.2, dotted)")
        bottom.set_xlabel("fixed steps")
        for ax in (top, bottom):
            ax.grid(True, which="major", alpha=0.3)
    axes[0][0].legend(fontsize=6, ncol=2)
    where = "one CPU thread" if device == "cpu" else device
    fig.suptitle(f"Few-step sampling of a flow-matching field ({where})")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def profile(device: str = "cpu", batch: int = 256, calls: int = 2000, top: int = 15) -> None:
    """cProfile of ``calls`` 2-step euler solves by neuralode (batch ``batch``): where the time goes,
    neuralode's functions and the finiteness checks by cumulative time (cProfile inflates small calls)."""
    torch.set_num_threads(1)
    field = Field().to(device).requires_grad_(False)
    x0 = torch.randn(batch, 2, device=device)
    run = solver("neuralode", "euler", 2)
    run(field, x0)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        run(field, x0)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(r"neuralode/|isfinite|\b(cat|stack|sum)\b", top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per case (default 15, quick 3)")
    parser.add_argument("--quick", action="store_true", help="2, 8 and 32 steps only, 3 repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", action="store_true", help="print cProfile of 2-step euler solves and stop")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.profile:
        profile(args.device)
        return
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 15)
    if repeats < 1:
        parser.error(f"--repeats must be at least 1, got {repeats}")
    result = measure(repeats, steps=(2, 8, 32) if args.quick else STEPS, device=args.device)
    table = to_markdown(result)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    result["meta"] = {"torch": torch.__version__, "torchdiffeq": getattr(torchdiffeq, "__version__", "?"),
                      "python": platform.python_version(), "machine": platform.machine(), "threads": 1,
                      "device": args.device, "repeats": repeats,
                      "field": "MLP [x, t] 2-64-64-64-2 SiLU, 400 CFM steps on 8 Gaussians",
                      "rk4": "the 3/8 rule in all three (torchdiffeq 'rk4', neuralode 'rk4_38')"}
    (args.out / "sampling.json").write_text(json.dumps(result, indent=2))
    (args.out / "sampling.md").write_text(table + "\n")
    import matplotlib

    matplotlib.use("Agg")  # a script: no display
    plot(result, args.out / "sampling.png", args.device)


if __name__ == "__main__":
    main()
