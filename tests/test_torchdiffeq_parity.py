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
