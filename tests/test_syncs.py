"""Host-device synchronisations per solve: what a GPU user waits on, counted on the CPU.

Every read of a tensor's value on the host (``.item()``, ``float()``, ``bool()``, ``int()``,
``nonzero``) goes through a few ATen operators; a dispatch mode counts them, and ``Tensor.tolist``,
``.numpy`` and ``.cpu`` are wrapped for the duration (on a GPU each is a synchronisation). The
counts must match what ``neuralode._loop``'s docstring says:

- an adaptive method: one per attempted step (the error ratio), plus a few per solve;
- a fixed-step method: a few per solve, however many steps;
- ``rodas4``: as an adaptive method, plus one per accepted step with outputs inside it;
- the adjoint: one per attempted step of the forward and of the backward solve, plus a few.

Each test compares two solves that take different numbers of steps, so that "per step" is
measured, not assumed: the difference in synchronisations must equal the difference in steps.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import neuralode as node

PER_SOLVE = 12  # the most a solve may add besides its per-step reads (a few today: first step, finish)
ADAPTIVE = [m for m in node.METHODS if m not in ("euler", "midpoint", "heun2", "heun3", "rk4", "rk4_38", "rodas4")]
FIXED = ["euler", "midpoint", "heun2", "heun3", "rk4", "rk4_38"]


class HostReads(TorchDispatchMode):
    """Counts host reads of tensor values while active."""

    OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal"}

    def __init__(self):
        super().__init__()
        self.count = 0
        self._patched = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in ("tolist", "numpy", "cpu"):
            original = getattr(torch.Tensor, name)

            def wrapped(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, wrapped)
            self._patched.append((name, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._patched:
            setattr(torch.Tensor, name, original)
        self._patched.clear()
        return super().__exit__(*exc)


def forced(t, y):
    return torch.stack([y[..., 1], -y[..., 0] + 0.1 * torch.sin(t)], -1)


Y0 = torch.tensor([[1.0, 0.0]] * 4, dtype=torch.float64)


def _solve(method, t, **kw):
    tol = 1e-4 if method == "adaptive_heun" else 1e-6  # a second-order pair needs ~1e4 steps at 1e-6
    with HostReads() as reads:
        _, stats = node.odeint(forced, Y0, t, method=method, rtol=tol, atol=tol / 100, return_stats=True, **kw)
    return reads.count, stats


def test_the_counter_sees_each_kind_of_host_read():
    x = torch.ones(3)
    with HostReads() as reads:
        x.sum().item(), float(x[0]), bool(x.all()), int(x[1]), x.tolist(), x.nonzero(), x.cpu()
    assert reads.count == 7


@pytest.mark.parametrize("method", ADAPTIVE + ["rodas4"])
def test_one_read_per_attempted_step(method):
    short_reads, short = _solve(method, [0.0, 5.0])
    long_reads, long = _solve(method, [0.0, 20.0])
    attempts = lambda s: s.n_accepted + s.n_rejected  # noqa: E731
    assert attempts(long) > attempts(short) + 20
    assert long_reads - short_reads == attempts(long) - attempts(short)
    assert 0 <= short_reads - attempts(short) <= PER_SOLVE


def test_rodas4_adds_one_read_per_step_with_outputs_inside():
    end_reads, end = _solve("rodas4", [0.0, 20.0])
    grid = torch.linspace(0.0, 20.0, 50, dtype=torch.float64)
    grid_reads, grid_stats = _solve("rodas4", grid)
    assert (grid_stats.n_accepted, grid_stats.n_rejected) == (end.n_accepted, end.n_rejected)
    ys = node.odeint(forced, Y0, grid, method="rodas4", rtol=1e-6, atol=1e-8)  # the same steps
    assert 0 < grid_reads - end_reads <= 48  # at most one per interior output (48 of them)
    assert torch.isfinite(ys).all()


@pytest.mark.parametrize("method", FIXED)
def test_fixed_steps_read_a_few_times_per_solve_whatever_the_steps(method):
    few, _ = _solve(method, [0.0, 5.0], options={"step_size": 0.5})
    many, _ = _solve(method, [0.0, 5.0], options={"step_size": 0.005})
    assert few == many <= PER_SOLVE


def test_the_adjoint_reads_once_per_step_forward_and_backward():
    p = torch.nn.Parameter(torch.tensor(0.1, dtype=torch.float64))

    def f(t, y):
        return torch.stack([y[..., 1], -y[..., 0] + p * torch.sin(t)], -1)

    counts = []
    for t1 in (5.0, 20.0):
        with HostReads() as reads:
            ys, stats = node.odeint_adjoint(f, Y0, [0.0, t1], rtol=1e-6, atol=1e-8, return_stats=True,
                                            adjoint_params=(p,))
            ys[-1].sum().backward()
        steps = stats.n_accepted + stats.n_rejected + stats.backward_n_accepted + stats.backward_n_rejected
        counts.append((reads.count, steps))
    (short_reads, short_steps), (long_reads, long_steps) = counts
    assert long_steps > short_steps + 20
    assert long_reads - short_reads == long_steps - short_steps
    assert 0 <= short_reads - short_steps <= PER_SOLVE
