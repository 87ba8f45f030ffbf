"""Code written for torchdiffeq runs on neuralode with the import swapped (issue 17, growing).

Each test makes the same call through both libraries and compares what comes back.
"""

from __future__ import annotations

import pytest
import torch
import torchdiffeq

import neuralode as node

F64 = torch.float64


def _decay(t, y):
    return -y * (1 + torch.sin(t))


@pytest.mark.parametrize("odeint_pair", [(node.odeint, torchdiffeq.odeint),
                                         (node.odeint_adjoint, torchdiffeq.odeint_adjoint)], ids=["odeint", "adjoint"])
def test_method_none_is_the_default_method(odeint_pair):
    ours, theirs = odeint_pair
    y0 = torch.tensor([1.0, -0.5], dtype=F64)
    t = torch.tensor([0.0, 0.5, 2.0], dtype=F64)
    extra = {"adjoint_params": ()} if ours is node.odeint_adjoint else {}
    ys_none = ours(_decay, y0, t, method=None, rtol=1e-9, atol=1e-9, **extra)
    ys_default = ours(_decay, y0, t, rtol=1e-9, atol=1e-9, **extra)
    assert torch.equal(ys_none, ys_default)
    ys_theirs = theirs(_decay, y0, t, method=None, rtol=1e-9, atol=1e-9, **extra)
    assert torch.allclose(ys_none, ys_theirs, rtol=1e-7, atol=1e-9)


def _one_hard_sample(batch: int):
    """A batch of independent samples: sample 0 oscillates fast, the others barely move."""
    rates = torch.full((batch, 1), 0.01, dtype=F64)
    rates[0] = 30.0

    def f(t, y):
        return torch.cat([rates * y[:, 1:], -rates * y[:, :1]], dim=1)

    y0 = torch.zeros(batch, 2, dtype=F64)
    y0[:, 0] = 1.0
    return f, y0, rates


def test_per_sample_norm_keeps_one_hard_sample_within_the_tolerance():
    # With the default RMS over the batch, the hard sample's error is diluted by the 99 easy ones;
    # "per_sample" makes the worst sample decide, as solving it alone would.
    f, y0, rates = _one_hard_sample(100)
    t = [0.0, 1.0]
    exact = torch.tensor([torch.cos(rates[0] * 1.0).item(), -torch.sin(rates[0] * 1.0).item()], dtype=F64)
    tol = dict(rtol=1e-6, atol=1e-6)
    averaged, avg_stats = node.odeint(f, y0, t, return_stats=True, **tol)
    worst, worst_stats = node.odeint(f, y0, t, return_stats=True, options={"norm": "per_sample"}, **tol)
    alone = node.odeint(lambda s, y: f(s, torch.cat([y, y0[1:]]))[:1], y0[:1], t, **tol)
    err_avg = (averaged[-1, 0] - exact).abs().max().item()
    err_worst = (worst[-1, 0] - exact).abs().max().item()
    err_alone = (alone[-1, 0] - exact).abs().max().item()
    assert err_avg > 3 * err_worst, (err_avg, err_worst)
    assert err_worst < 3 * err_alone + 1e-12, (err_worst, err_alone)
    assert worst_stats.n_accepted > avg_stats.n_accepted


def test_a_callable_norm_gets_the_structured_error_like_torchdiffeq():
    seen = []

    def linf(x):
        seen.append(type(x))
        parts = x if isinstance(x, tuple) else (x,)
        return max(p.abs().max() for p in parts)

    def f(t, y):
        return (-2.0 * y[0] + y[1], -0.5 * y[1])

    y0 = (torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([0.5], dtype=F64))
    t = torch.tensor([0.0, 1.0, 3.0], dtype=F64)
    ours, stats = node.odeint(f, y0, t, rtol=1e-6, atol=1e-8, options={"norm": linf}, return_stats=True)
    assert seen and all(s is tuple for s in seen)
    builtin, builtin_stats = node.odeint(f, y0, t, rtol=1e-6, atol=1e-8, options={"norm": "max"}, return_stats=True)
    assert builtin_stats.step_times == stats.step_times  # the same norm, built in
    theirs = torchdiffeq.odeint(f, y0, t, rtol=1e-6, atol=1e-8, options={"norm": linf})
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"options\['norm'\].*per_sample"):
        node.odeint(f, y0, t, options={"norm": "l2"})


def test_adjoint_options_seminorm_is_seminorm_true():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t, y):
            return self.net(y)

    y0 = torch.randn(8, 2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    stats = {}
    for name, kwargs in (("flag", {"seminorm": True}), ("option", {"adjoint_options": {"norm": "seminorm"}}),
                         ("full", {})):
        ys, st = node.odeint_adjoint(Field(), y0, t, rtol=1e-7, atol=1e-9, return_stats=True, **kwargs)
        ys.pow(2).sum().backward()
        stats[name] = (st.backward_nfe, [p.grad.clone() for p in net.parameters()])
        net.zero_grad()
    assert stats["flag"][0] == stats["option"][0] < stats["full"][0]
    assert all(torch.equal(a, b) for a, b in zip(stats["flag"][1], stats["option"][1]))
    with pytest.raises(ValueError, match="seminorm"):
        node.odeint_adjoint(Field(), y0, t, adjoint_options={"norm": "rms"})


# method -> (rtol = atol, the error bound both libraries meet with jump_t)
JUMP_CASES = {"dopri5": (1e-8, 1e-6), "bosh3": (1e-7, 2e-5), "adaptive_heun": (1e-5, 1e-3), "rodas4": (1e-8, 1e-6)}


@pytest.mark.parametrize("method", list(JUMP_CASES))
def test_jump_t_lands_on_the_jump_and_integrates_each_side_exactly(method):
    # f switches at t = 1 from -y to 2 - y: without jump_t the controller finds the discontinuity by
    # rejecting steps across it (10 to 25 here); with it one step ends there, the next starts afresh
    # from the right limit, and the error meets the bound both libraries meet.
    calls = []

    def f(t, y):
        calls.append(float(t.detach()))
        return torch.where(t < 1.0, -y, 2.0 - y)

    y0 = torch.tensor([1.0], dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.5, 3.0], dtype=F64)
    e1 = torch.exp(torch.tensor(-1.0, dtype=F64))
    exact = torch.stack([torch.exp(-t[i]) if t[i] < 1 else 2 - (2 - e1) * torch.exp(-(t[i] - 1)) for i in range(4)])
    rtol, bound = JUMP_CASES[method]
    tol = dict(rtol=rtol, atol=rtol, method=method)
    ys, stats = node.odeint(f, y0, t, options={"jump_t": [1.0]}, return_stats=True, **tol)
    plain, plain_stats = node.odeint(f, y0, t, return_stats=True, **tol)
    assert 1.0 in stats.step_times
    err, plain_err = (ys[:, 0] - exact).abs().max().item(), (plain[:, 0] - exact).abs().max().item()
    assert err < bound, (err, plain_err)
    assert stats.n_rejected < plain_stats.n_rejected
    # The right limit is evaluated just after the jump (the left limit's last stage just before it).
    assert any(1.0 < s < 1.0 + 1e-12 for s in calls) and any(1.0 - 1e-12 < s < 1.0 for s in calls)
    if method != "rodas4":
        theirs = torchdiffeq.odeint(f, y0, t, options={"jump_t": torch.tensor([1.0], dtype=F64)}, **tol)
        assert (theirs[:, 0] - exact).abs().max().item() < bound


def test_step_t_lands_on_the_given_times():
    ys, stats = node.odeint(_decay, torch.ones(2, dtype=F64), [0.0, 2.0], options={"step_t": [0.3, 1.7, 5.0]},
                            return_stats=True)
    assert 0.3 in stats.step_times and 1.7 in stats.step_times and stats.step_times[-1] == 2.0
    with pytest.raises(ValueError, match=r"step_t.*finite"):
        node.odeint(_decay, torch.ones(2, dtype=F64), [0.0, 2.0], options={"step_t": [float("nan")]})
