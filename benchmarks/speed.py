"""neuralode against torchdiffeq, side by side in one process: median wall time and NFE.

Cases (issue 3):
  (a) torchdiffeq's spiral demo, dy/dt = (y**3) @ A, 1000 output times on [0, 25], dopri5 at
      rtol 1e-7, atol 1e-9 (forward only);
  (b) an MLP vector field (batch 256, width 32, hidden 128, tanh), forward and backward through
      the solver, dopri5 at rtol = atol = 1e-5;
  (c) the same model and tolerance, gradients from the adjoint method (odeint_adjoint in both
      libraries, default settings); NFE counts forward and backward evaluations.

Both libraries run interleaved in the same process on one thread, so drift in the machine's
load hits both alike. Run: ``python benchmarks/speed.py [--repeats N] [--out DIR]``.

The arithmetic floor (cases a and b): the accepted dopri5 steps that neuralode took (its
``stats.step_times``) replayed in a bare loop, timed interleaved with the two libraries: the seven
Dormand-Prince stages with FSAL and nothing else (no error estimate or step-size control, no
rejected steps, no initial-step estimate, no interpolation; in case (a) no output at the 1000
times, only the final state). For (b) it includes the backward pass through that loop. Its final
state is checked against neuralode's, so a wrong floor cannot be reported. ``neuralode_s /
floor_s`` is what the solver adds on top of the arithmetic its steps need.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torchdiffeq
from torch import Tensor

import neuralode as node


class Counted:
    """Counts calls of ``f(t, y)``: the only way to read torchdiffeq's NFE from outside."""

    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, t, y):
        self.calls += 1
        return self.f(t, y)


# Each case is ``make(dtype) -> run``; ``run(solver, out=None)`` solves once and returns the NFE,
# and, given a dict ``out``, leaves there the final state (and for (b) the parameters' gradients)
# for the floor's check. The benchmark runs in float32; float64 only checks the floor.


def spiral_case(dtype: torch.dtype = torch.float32):
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=dtype)
    y0 = torch.tensor([[2.0, 0.0]], dtype=dtype)
    t = torch.linspace(0.0, 25.0, 1000)

    def f(t, y):
        return (y**3) @ A

    def run(solver, out: dict | None = None):
        counted = Counted(f)
        ys = solver(counted, y0, t, rtol=1e-7, atol=1e-9)
        if out is not None:
            out["y"] = ys[-1].detach().clone()
        return counted.calls

    return run


def mlp_case(dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Tanh(), torch.nn.Linear(128, 32)).to(dtype)
    y0 = torch.randn(256, 32).to(dtype)
    t = torch.tensor([0.0, 1.0])

    def run(solver, out: dict | None = None):
        counted = Counted(lambda t, y: net(y))
        net.zero_grad()
        y1 = solver(counted, y0, t, rtol=1e-5, atol=1e-5)[-1]
        y1.pow(2).sum().backward()
        if out is not None:
            out["y"] = y1.detach().clone()
            out["grads"] = [p.grad.clone() for p in net.parameters()]
        return counted.calls  # forward and backward: backprop through the solver adds no calls

    return run


class _Field(torch.nn.Module):
    """torchdiffeq's adjoint needs an nn.Module whose parameters it can find."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, t, y):
        return self.net(y)


def mlp_adjoint_case():
    torch.manual_seed(0)
    field = _Field(torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Tanh(), torch.nn.Linear(128, 32)))
    y0 = torch.randn(256, 32, requires_grad=True)
    t = torch.tensor([0.0, 1.0])

    def run(solver):
        calls = [0]
        original = field.forward

        def counted(t, y):
            calls[0] += 1
            return original(t, y)

        field.forward = counted
        try:
            field.zero_grad()
            solver(field, y0, t, rtol=1e-5, atol=1e-5)[-1].pow(2).sum().backward()
        finally:
            field.forward = original
        return calls[0]

    return run


class DopriFloor:
    """The arithmetic floor of a dopri5 solve: given accepted step times replayed in a bare loop.

    Called like the solvers (``floor(func, y0, t, **ignored)``), it takes the steps from ``t[0]``
    to each of ``step_times`` in turn: the seven Dormand-Prince stages, the last one reused as the
    next step's first (FSAL), ``y`` advanced by the fifth-order weights (dopri5's last row of
    ``a``). No error estimate, step-size control, rejected step or interpolation. ``func`` gets
    ``t`` as a Python float. Returns the final state with a leading axis of length 1, so that
    ``[-1]`` picks it as it picks the last output of ``odeint``.
    """

    def __init__(self, step_times: list[float]):
        tableau = node.TABLEAUS["dopri5"]
        if not (tableau.fsal and len(tableau.c) == 7 and list(tableau.a[-1]) == list(tableau.b[:6])):
            raise ValueError("the floor assumes dopri5's FSAL tableau: 7 stages, last row of a = b")
        # Coefficients as floats once: per stage its node and its nonzero (stage index, a_ij).
        self.c = [float(ci) for ci in tableau.c[1:]]
        self.a = [[(j, float(w)) for j, w in enumerate(row) if w != 0] for row in tableau.a]
        self.step_times = [float(t1) for t1 in step_times]

    def __call__(self, func, y0: Tensor, t, **_ignored) -> Tensor:
        tn = float(t[0])
        y, f = y0, func(tn, y0)
        for t1 in self.step_times:
            h = t1 - tn
            ks = [f]
            for ci, row in zip(self.c, self.a):
                (j, w), *rest = row
                yi = torch.add(y, ks[j], alpha=h * w)
                for j, w in rest:
                    yi.add_(ks[j], alpha=h * w)
                ks.append(func(tn + ci * h, yi))
            y, f, tn = yi, ks[-1], t1
        return y.unsqueeze(0)


def _close(a: Tensor, b: Tensor) -> float:
    """Largest difference relative to the largest entry."""
    return float((a - b).abs().max() / b.abs().max())


def make_floor(make, dtype: torch.dtype = torch.float32) -> DopriFloor:
    """The floor of case ``make`` in ``dtype``: neuralode's accepted step times, replayed; checked.

    The replay must reproduce neuralode's final state (and, for (b), its parameters' gradients):
    to 1e-12 relative in float64, and in float32 to 1e-4, float32 rounding accumulated over the
    steps (today the replay is bitwise equal, but only because it sums the stages in the engine's
    order; summed in reverse, the spiral's 357 float32 steps drift apart by 2e-5). The float64 check
    is the sharp one: a floor that drops the spiral's first step misses by 4e-12 there, one that
    has one coefficient off by 1e-4 relative by 1e-4.
    """
    run = make(dtype)
    seen: dict = {}

    def neuralode_with_stats(*args, **kwargs):
        ys, seen["stats"] = node.odeint(*args, method="dopri5", return_stats=True, **kwargs)
        return ys

    ours, replayed = {}, {}
    run(neuralode_with_stats, ours)
    floor = DopriFloor(seen["stats"].step_times)
    run(floor, replayed)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    pairs = [("final state", replayed["y"], ours["y"])]
    pairs += [(f"gradient {i}", g, h) for i, (g, h) in enumerate(zip(replayed.get("grads", []), ours.get("grads", [])))]
    for what, mine, theirs in pairs:
        gap = _close(mine, theirs)
        if not gap <= tol:
            raise AssertionError(f"the floor's {what} differs from neuralode's by {gap:.3g} relative ({dtype}; "
                                 f"allowed {tol:g}): the floor is wrong, not reporting it")
    return floor


CASES = {
    "spiral (a): 1000 outputs, dopri5 1e-7/1e-9, forward": spiral_case,
    "MLP (b): batch 256, width 32, hidden 128, dopri5 1e-5, forward+backward": mlp_case,
    "MLP (c): as (b), gradients by the adjoint method": mlp_adjoint_case,
}


def measure(repeats: int = 15) -> list[dict]:
    """Median times and NFE of both libraries (and, but for the adjoint, of the arithmetic floor)
    on every case, interleaved."""
    torch.set_num_threads(1)
    rows = []
    for name, make in CASES.items():
        run = make()
        adjoint = "adjoint" in name
        solvers = {"neuralode": node.odeint_adjoint if adjoint else node.odeint,
                   "torchdiffeq": torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint}
        if not adjoint:
            make_floor(make, torch.float64)  # checks the floor's arithmetic tightly; not timed
            solvers["floor"] = make_floor(make)
        nfe = {lib: run(solver) for lib, solver in solvers.items()}  # also warms up
        times = {lib: [] for lib in solvers}
        for _ in range(repeats):
            for lib, solver in solvers.items():
                start = time.perf_counter()
                run(solver)
                times[lib].append(time.perf_counter() - start)
        med = {lib: statistics.median(ts) for lib, ts in times.items()}
        rows.append({
            "case": name,
            "neuralode_s": med["neuralode"],
            "torchdiffeq_s": med["torchdiffeq"],
            "time_ratio": med["neuralode"] / med["torchdiffeq"],
            "neuralode_nfe": nfe["neuralode"],
            "torchdiffeq_nfe": nfe["torchdiffeq"],
            # The arithmetic floor (None for the adjoint case): see the module docstring.
            "floor_s": med.get("floor"),
            "floor_ratio": med["neuralode"] / med["floor"] if "floor" in med else None,
            "floor_nfe": nfe.get("floor"),
        })
    return rows


FLOOR_NOTE = (
    "Floor: neuralode's own accepted dopri5 steps replayed in a bare loop (the seven stages with FSAL; "
    "no error control, no rejected steps, no interpolation), checked to reproduce neuralode's final state. "
    "For (a) it is the bare stepping only: no outputs at the 1000 times, just the final state. For (b) it "
    "includes the backward pass through the loop. (c) has none. Ratios are of median times; "
    "neuralode/torchdiffeq is `time_ratio` in speed.json, neuralode/floor is `floor_ratio`.")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.1f}"


def _ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def to_markdown(rows: list[dict]) -> str:
    lines = ["| case | neuralode (ms) | torchdiffeq (ms) | floor (ms) | neuralode/torchdiffeq | neuralode/floor "
             "| NFE neuralode | NFE torchdiffeq | NFE floor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {1e3 * r['neuralode_s']:.1f} | {1e3 * r['torchdiffeq_s']:.1f} | "
                     f"{_ms(r.get('floor_s'))} | {r['time_ratio']:.2f} | {_ratio(r.get('floor_ratio'))} | "
                     f"{r['neuralode_nfe']} | {r['torchdiffeq_nfe']} | {r.get('floor_nfe') or '-'} |")
    return "\n".join(lines) + "\n\n" + FLOOR_NOTE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rows = measure(args.repeats)
    table = to_markdown(rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "torchdiffeq": getattr(torchdiffeq, "__version__", "?"),
            "python": platform.python_version(), "machine": platform.machine(), "threads": 1,
            "floor": FLOOR_NOTE}
    (args.out / "speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (args.out / "speed.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
