import math

import pytest
import torch

from neuralode.latent import LatentODE, RecognitionRNN, RNNBaseline, gaussian_kl


def _series(batch=16, steps=40, seed=0):
    """Noisy spirals r = 0.3 + 0.1 t on a shared grid, each observed at its own random subset."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 4 * math.pi, steps)
    direction = torch.where(torch.rand(batch, generator=g) < 0.5, -1.0, 1.0)[:, None]
    phase = 2 * math.pi * torch.rand(batch, 1, generator=g)
    r = 0.3 + 0.1 * t
    x = torch.stack([r * torch.cos(direction * t + phase), r * torch.sin(direction * t + phase)], dim=-1)
    x = x + 0.05 * torch.randn(x.shape, generator=g)
    mask = torch.rand(batch, steps, generator=g) < 0.6
    return x, t, mask


def test_gaussian_kl_closed_form():
    mean, logvar = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.2, -0.3]])
    by_hand = 0.5 * sum(m**2 + math.exp(v) - 1 - v for m, v in [(0.5, 0.2), (-1.0, -0.3)])
    assert gaussian_kl(mean, logvar).item() == pytest.approx(by_hand)
    assert gaussian_kl(torch.zeros(1, 3), torch.zeros(1, 3)).item() == 0


def test_encoder_ignores_unobserved_points_and_reads_gaps():
    torch.manual_seed(0)
    encoder = RecognitionRNN(2, latent_dim=4)
    x, t, mask = _series(batch=4)
    mean, logvar = encoder(x, t, mask)
    assert mean.shape == logvar.shape == (4, 4)
    changed = x.clone()
    changed[~mask] = 100.0  # unobserved values must not matter
    assert torch.allclose(encoder(changed, t, mask)[0], mean)
    assert not torch.allclose(encoder(x, t * 2, mask)[0], mean)  # the gaps do


def test_elbo_is_finite_and_increases_over_a_few_steps():
    torch.manual_seed(0)
    model = LatentODE(obs_dim=2, latent_dim=4, obs_std=0.3)
    x, t, mask = _series()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    values = []
    for step in range(20):
        elbo, loglik, kl = model.elbo(x, t, mask, generator=torch.Generator().manual_seed(step))
        assert torch.isfinite(elbo) and kl >= 0
        optimizer.zero_grad()
        (-elbo).backward()
        optimizer.step()
        values.append(elbo.item())
    assert sum(values[-5:]) / 5 > sum(values[:5]) / 5 + 1.0


def test_latent_trajectory_backwards_and_forwards_in_time():
    torch.manual_seed(0)
    model = LatentODE(latent_dim=3).double()
    z0 = torch.randn(2, 3, dtype=torch.float64)
    t0 = torch.tensor(1.0, dtype=torch.float64)
    times = torch.tensor([-0.5, 0.2, 1.0, 1.7], dtype=torch.float64)
    traj = model.latent_trajectory(z0, t0, times)
    assert traj.shape == (2, 4, 3) and torch.allclose(traj[:, 2], z0)
    # The backward part agrees with solving forwards from z(-0.5) back up to t0.
    again = model.latent_trajectory(traj[:, 0], times[0], torch.tensor([1.0], dtype=torch.float64))
    assert torch.allclose(again[:, 0], z0, atol=1e-3)
    assert model.predict(torch.zeros(2, 4, 2, dtype=torch.float64), times, None, times).shape == (2, 4, 2)
    assert model.sample(3, t0, times).shape == (3, 4, 2)


def test_rnn_baseline_predicts_from_the_past_only_and_learns():
    torch.manual_seed(0)
    rnn = RNNBaseline(2)
    x, t, mask = _series()
    predictions = rnn(x, t, mask)
    later = x.clone()
    later[:, 20:] += 5.0
    assert torch.allclose(rnn(later, t, mask)[:, :21], predictions[:, :21])  # x_j unseen when predicting x_j
    optimizer = torch.optim.Adam(rnn.parameters(), lr=1e-2)
    first = rnn.loss(x, t, mask).item()
    for _ in range(25):
        loss = rnn.loss(x, t, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.7 * first


def test_shape_errors():
    model = LatentODE()
    with pytest.raises(ValueError, match="shape \\(batch, time, features\\)"):
        model.elbo(torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="t must have shape \\(5,\\)"):
        model.elbo(torch.zeros(2, 5, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="mask must have shape"):
        model.elbo(torch.zeros(2, 5, 2), torch.linspace(0, 1, 5), torch.ones(2, 4, dtype=torch.bool))


def test_dynamics_layers_sets_the_depth_of_f():
    """The paper's spirals use one hidden layer of 20 units; the default is torchdiffeq's two."""
    linears = lambda m: [l for l in m.dynamics.modules() if isinstance(l, torch.nn.Linear)]  # noqa: E731
    assert len(linears(LatentODE(dynamics_layers=1))) == 2
    assert len(linears(LatentODE())) == 3
    assert [l.out_features for l in linears(LatentODE(latent_dim=4, dynamics_hidden=20, dynamics_layers=1))] == [20, 4]


def test_decoder_hidden_zero_gives_a_linear_decoder_that_extrapolates_linearly():
    torch.manual_seed(0)
    linear = LatentODE(obs_dim=3, latent_dim=4, decoder_hidden=0).double()
    assert isinstance(linear.decoder, torch.nn.Linear) and linear.decoder.weight.shape == (3, 4)
    z = torch.randn(5, 4, dtype=torch.float64)
    for scale in (1.0, 10.0, 100.0):   # affine at any distance: dec(a z1 + (1 - a) z2) = a dec(z1) + (1 - a) dec(z2)
        z1, z2 = scale * z, -scale * z.flip(0)
        torch.testing.assert_close(linear.decoder(0.3 * z1 + 0.7 * z2), 0.3 * linear.decoder(z1) + 0.7 * linear.decoder(z2))
    default = LatentODE(obs_dim=3, latent_dim=4)
    assert isinstance(default.decoder, torch.nn.Sequential) and default.decoder[0].out_features == 20
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="decoder_hidden must be an int >= 0"):
            LatentODE(decoder_hidden=bad)


def test_predict_decodes_the_posterior_mean_or_a_posterior_sample():
    torch.manual_seed(0)
    model = LatentODE(latent_dim=4, rtol=1e-8, atol=1e-9).double()
    x, t, mask = _series(batch=5)
    x, t = x.double(), t.double()
    with torch.no_grad():
        mean, logvar = model.encoder(x, t, mask)
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(4), dtype=mean.dtype)
        by_hand = model.decode(mean + eps * (0.5 * logvar).exp(), t[0], t)
        assert torch.allclose(model.predict(x, t, mask, t), model.decode(mean, t[0], t))
    sampled = model.predict(x, t, mask, t, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(sampled, by_hand, atol=1e-10)
    assert not torch.allclose(sampled, model.predict(x, t, mask, t), atol=1e-3)  # a sample is not the mean


def test_noise_is_drawn_on_the_generator_device_and_moved_to_the_model():
    """A CPU generator must seed a model on another device (torch.randn refuses a CUDA tensor from a
    CPU generator): the draw consumes the generator on its own device, then moves."""
    from neuralode._random import randn  # what latent, cnf and flows draw with

    like = torch.empty(3, 4, dtype=torch.float64, device="meta")
    g, reference = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    out = randn((3, 4), like, g)
    assert out.device.type == "meta" and out.dtype == torch.float64
    torch.randn((3, 4), generator=reference, dtype=torch.float64)
    assert torch.equal(g.get_state(), reference.get_state())  # the CPU generator was advanced, as on the CPU
    cpu = randn((3, 4), torch.empty(0, dtype=torch.float64), torch.Generator().manual_seed(5))
    assert torch.equal(cpu, torch.randn((3, 4), generator=torch.Generator().manual_seed(5), dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the CPU case is the test above")
def test_elbo_sample_and_predict_on_cuda_with_a_cpu_generator():
    torch.manual_seed(0)
    model = LatentODE().cuda()
    x, t, mask = (a.cuda() for a in _series(batch=4))
    cpu_model = LatentODE()
    cpu_model.load_state_dict(model.state_dict())
    elbo = model.elbo(x, t, mask, generator=torch.Generator().manual_seed(1))[0]
    elbo_cpu = cpu_model.elbo(x.cpu(), t.cpu(), mask.cpu(), generator=torch.Generator().manual_seed(1))[0]
    assert abs(elbo.item() - elbo_cpu.item()) < 1e-3 * (1 + abs(elbo_cpu.item()))
    assert model.sample(2, t[0], t, generator=torch.Generator().manual_seed(2)).is_cuda
    assert model.predict(x, t, mask, t, generator=torch.Generator().manual_seed(3)).is_cuda


# ---------------------------------------------------------------- latent ODE with a Poisson process
from neuralode.latent import PoissonLatentODE  # noqa: E402


def _event_grid(batch=12, steps=80, rate=3.0, t1=5.0, seed=0, dtype=torch.float64):
    """Events of a homogeneous process of the given rate, binned to a fine shared grid."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, t1, steps, dtype=dtype)
    events = torch.rand(batch, steps, generator=g) < rate * (t1 / (steps - 1))
    return t, events


def test_compensator_is_the_integral_of_the_intensity_along_the_same_trajectory():
    torch.manual_seed(0)
    model = PoissonLatentODE(obs_dim=0, latent_dim=3, rtol=1e-10, atol=1e-10).double()
    z0 = torch.randn(4, 3, dtype=torch.float64)
    t = torch.linspace(0, 2, 2001, dtype=torch.float64)
    zs, big_lambda = model.trajectory_and_compensator(z0, t)
    assert zs.shape == (4, 2001, 3) and big_lambda.shape == (4, 2001)
    assert torch.all(big_lambda[:, 0] == 0) and torch.all(big_lambda[:, 1:] > big_lambda[:, :-1])
    rates = model.intensity(zs)
    trapezoid = ((rates[:, 1:] + rates[:, :-1]) / 2 * (t[1] - t[0])).sum(dim=1)
    assert torch.allclose(big_lambda[:, -1], trapezoid, rtol=1e-6)
    # The latent part is the plain latent ODE's trajectory.
    assert torch.allclose(zs, model.latent_trajectory(z0, t[0], t), atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_poisson_elbo_parts_and_adjoint_gradients(dtype):
    torch.manual_seed(0)
    model = PoissonLatentODE(obs_dim=2, latent_dim=3, rtol=1e-8, atol=1e-8).to(dtype)
    twin = PoissonLatentODE(obs_dim=2, latent_dim=3, rtol=1e-8, atol=1e-8, adjoint=True).to(dtype)
    twin.load_state_dict(model.state_dict())
    x, t, mask = _series(batch=6, steps=30)
    x, t = x.to(dtype), t.to(dtype)
    events = torch.rand(6, 30, generator=torch.Generator().manual_seed(1)) < 0.3
    grads = []
    for m in (model, twin):
        elbo, observed, event_ll, kl = m.elbo(x, t, mask, events, generator=torch.Generator().manual_seed(2))
        assert elbo.dtype == dtype and torch.isfinite(elbo) and kl >= 0
        assert torch.allclose(elbo, observed + event_ll - kl)
        elbo.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    scale = grads[0].abs().max()
    assert (grads[0] - grads[1]).abs().max() <= (1e-2 if dtype == torch.float32 else 1e-5) * scale


def test_poisson_encoder_reads_events_and_observations_only():
    torch.manual_seed(0)
    model = PoissonLatentODE(obs_dim=2, latent_dim=3)
    x, t, mask = _series(batch=4, steps=30)
    events = torch.zeros(4, 30, dtype=torch.bool)
    events[:, 5] = True
    mean, _ = model.encode(x, t, mask, events)
    changed = x.clone()
    changed[~mask] = 50.0
    assert torch.allclose(model.encode(changed, t, mask, events)[0], mean)
    moved = torch.zeros_like(events)
    moved[:, 6] = True
    assert not torch.allclose(model.encode(x, t, mask, moved)[0], mean)  # an event's time matters


def test_poisson_latent_ode_learns_a_constant_rate():
    torch.manual_seed(0)
    model = PoissonLatentODE(obs_dim=0, latent_dim=2, rnn_hidden=8, dynamics_hidden=8, intensity_hidden=8).double()
    t, events = _event_grid(batch=32, rate=3.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for step in range(60):
        elbo = model.elbo(None, t, None, events, generator=torch.Generator().manual_seed(step))[0]
        optimizer.zero_grad()
        (-elbo).backward()
        optimizer.step()
    rates = model.predict_intensity(None, t, None, events, t)
    assert abs(rates.mean().item() - 3.0) < 0.6, rates.mean().item()


def test_poisson_latent_ode_errors_name_the_argument():
    model = PoissonLatentODE(obs_dim=0)
    t, events = _event_grid(batch=2, steps=10, dtype=torch.float32)
    with pytest.raises(ValueError, match="events is required"):
        model.elbo(None, t, None)
    with pytest.raises(ValueError, match="events must be a .B, T. tensor of event counts"):
        model.elbo(None, t, None, events[:, :5])
    with pytest.raises(ValueError, match="strictly increasing"):
        model.elbo(None, t.flip(0), None, events)
    with pytest.raises(ValueError, match="decodes no observations"):
        model.sample(2, t[0], t)
    with pytest.raises(ValueError, match=r"x is required"):
        PoissonLatentODE(obs_dim=2).elbo(None, t, None, events)


def test_poisson_event_counts_weight_the_log_intensity():
    torch.manual_seed(0)
    model = PoissonLatentODE(obs_dim=0, latent_dim=3, rtol=1e-9, atol=1e-9).double()
    t = torch.linspace(0, 2, 21, dtype=torch.float64)
    counts = torch.zeros(2, 21, dtype=torch.long)
    counts[:, 4], counts[:, 9] = 2, 1
    # The ELBO's event term, recomputed from the same reparameterised z0 (same seed for eps).
    g = torch.Generator().manual_seed(0)
    mean, logvar = model.encode(None, t, None, counts)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0), dtype=mean.dtype)
    z0 = mean + eps * (0.5 * logvar).exp()
    zs, big_lambda = model.trajectory_and_compensator(z0, t)
    expected = (2 * model.intensity(zs[:, 4]).log() + model.intensity(zs[:, 9]).log() - big_lambda[:, -1]).mean()
    _, _, event_ll, _ = model.elbo(None, t, None, counts, generator=g)
    assert torch.allclose(event_ll, expected)
    with pytest.raises(ValueError, match="non-negative integer counts"):
        model.elbo(None, t, None, counts.double())
    with pytest.raises(ValueError, match="non-negative integer counts"):
        model.elbo(None, t, None, -counts)
