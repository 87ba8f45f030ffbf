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

import neuralode as node


class Counted:
    """Counts calls of ``f(t, y)``: the only way to read torchdiffeq's NFE from outside."""

    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, t, y):
        self.calls += 1
        return self.f(t, y)


def spiral_case():
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])
    y0 = torch.tensor([[2.0, 0.0]])
    t = torch.linspace(0.0, 25.0, 1000)

    def f(t, y):
        return (y**3) @ A

    def run(solver):
        counted = Counted(f)
        solver(counted, y0, t, rtol=1e-7, atol=1e-9)
        return counted.calls

    return run


def mlp_case():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Tanh(), torch.nn.Linear(128, 32))
    y0 = torch.randn(256, 32)
    t = torch.tensor([0.0, 1.0])

    def run(solver):
        counted = Counted(lambda t, y: net(y))
        net.zero_grad()
        solver(counted, y0, t, rtol=1e-5, atol=1e-5)[-1].pow(2).sum().backward()
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


CASES = {
    "spiral (a): 1000 outputs, dopri5 1e-7/1e-9, forward": spiral_case,
    "MLP (b): batch 256, width 32, hidden 128, dopri5 1e-5, forward+backward": mlp_case,
    "MLP (c): as (b), gradients by the adjoint method": mlp_adjoint_case,
}


def measure(repeats: int = 15) -> list[dict]:
    """Median times and NFE of both libraries on every case, interleaved."""
    torch.set_num_threads(1)
    rows = []
    for name, make in CASES.items():
        run = make()
        adjoint = "adjoint" in name
        solvers = {"neuralode": node.odeint_adjoint if adjoint else node.odeint,
                   "torchdiffeq": torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint}
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
        })
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = ["| case | neuralode (ms) | torchdiffeq (ms) | time ratio | NFE neuralode | NFE torchdiffeq |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {1e3 * r['neuralode_s']:.1f} | {1e3 * r['torchdiffeq_s']:.1f} | "
                     f"{r['time_ratio']:.2f} | {r['neuralode_nfe']} | {r['torchdiffeq_nfe']} |")
    return "\n".join(lines)


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
            "python": platform.python_version(), "machine": platform.machine(), "threads": 1}
    (args.out / "speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (args.out / "speed.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
