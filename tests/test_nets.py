import pytest
import torch

import neuralode as node
from problems import DEVICES


def test_concat_linear_equals_a_linear_layer_on_z_and_t():
    torch.manual_seed(0)
    layer = node.ConcatLinear(3, 4)
    z, t = torch.randn(5, 3), torch.tensor(0.7)
    expected = layer.linear(torch.cat([z, t.expand(5, 1)], dim=1))
    assert torch.allclose(layer(t, z), expected, atol=1e-6)


@pytest.mark.parametrize("time_dependent", [True, False])
def test_mlp_dynamics_shapes_and_time_dependence(time_dependent):
    torch.manual_seed(0)
    f = node.MLPDynamics(2, hidden=8, num_layers=3, time_dependent=time_dependent)
    z = torch.randn(7, 2)
    out0, out1 = f(torch.tensor(0.0), z), f(torch.tensor(1.0), z)
    assert out0.shape == (7, 2)
    assert (not torch.allclose(out0, out1)) == time_dependent
    assert len(f.layers) == 4


@pytest.mark.parametrize("kwargs, message", [(dict(num_layers=0), "num_layers"),
                                              (dict(activation="gelu"), "unknown activation 'gelu'")])
def test_mlp_dynamics_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        node.MLPDynamics(2, **kwargs)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_ode_block_solves_over_its_interval_and_reports_nfe(device):
    torch.manual_seed(0)
    f = node.MLPDynamics(2, hidden=8).to(device)
    block = node.ODEBlock(f, t0=0.0, t1=0.5, rtol=1e-6, atol=1e-6)
    z0 = torch.randn(4, 2, device=device)
    z1 = block(z0)
    assert z1.shape == (4, 2) and z1.device == z0.device
    expected = node.odeint(f, z0, [0.0, 0.5], rtol=1e-6, atol=1e-6)[-1]
    assert torch.allclose(z1, expected)
    assert block.nfe == block.stats.nfe > 0
    traj = block.trajectory(z0, torch.linspace(0, 0.5, 6))
    assert traj.shape == (6, 4, 2) and torch.allclose(traj[-1], z1, atol=1e-5)


def test_ode_block_trains_end_to_end():
    torch.manual_seed(0)
    model = torch.nn.Sequential(node.ODEBlock(node.MLPDynamics(2, hidden=16)), torch.nn.Linear(2, 1))
    x = torch.randn(64, 2)
    y = (x[:, :1] * x[:, 1:] > 0).float()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(p.grad is not None for p in model.parameters())


def test_augment_pads_zeros():
    x = torch.randn(3, 2)
    out = node.Augment(2)(x)
    assert out.shape == (3, 4) and torch.equal(out[:, :2], x) and not out[:, 2:].any()
    with pytest.raises(ValueError, match="extra_dims"):
        node.Augment(-1)


def test_ode_block_with_the_adjoint_gives_backprops_gradients_and_counts_backward_nfe():
    torch.manual_seed(0)
    f = node.MLPDynamics(2, hidden=8).double()
    z0 = torch.randn(4, 2, dtype=torch.float64)
    grads = {}
    for adjoint in (False, True):
        block = node.ODEBlock(f, rtol=1e-9, atol=1e-9, adjoint=adjoint, adjoint_kwargs={"seminorm": True})
        f.zero_grad()
        block(z0).pow(2).sum().backward()
        grads[adjoint] = torch.cat([p.grad.reshape(-1) for p in f.parameters()])
        assert (block.backward_nfe > 0) == adjoint
    assert torch.allclose(grads[True], grads[False], rtol=1e-5, atol=1e-8)


def test_tied_resnet_shares_one_block_at_every_depth():
    torch.manual_seed(0)
    tied = node.make_classifier("tied-resnet", channels=16)
    untied = node.make_classifier("resnet", channels=16)
    odenet = node.make_classifier("odenet", channels=16)
    feature = tied[1]
    assert isinstance(feature, node.nets.TiedResNet) and feature.depth == 6
    # One block's parameters: the stem and head plus a single ResBlock, the ODE-Net's order
    # (its ODE function has a few per-channel parameters more), not the six-block ResNet's.
    block = node.count_parameters(node.ResBlock(16))
    stem_head = node.count_parameters(untied) - node.count_parameters(untied[1])
    assert node.count_parameters(tied) == stem_head + block
    assert node.count_parameters(untied) == stem_head + 6 * block
    assert abs(node.count_parameters(tied) - node.count_parameters(odenet)) < 0.05 * node.count_parameters(odenet)
    # The same block acts at every depth: applying it six times by hand gives the output, and a
    # gradient reaches the one set of weights from all six applications.
    h = torch.randn(2, 16, 6, 6)
    expected = h
    for _ in range(6):
        expected = feature.block(expected)
    assert torch.allclose(feature(h), expected)
    feature(h).square().sum().backward()
    grads = [p.grad for p in feature.parameters()]
    assert len(grads) == len(list(feature.block.parameters())) and all(g is not None for g in grads)
    logits = tied(torch.randn(3, 1, 28, 28))
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="depth"):
        node.nets.TiedResNet(16, depth=0)
