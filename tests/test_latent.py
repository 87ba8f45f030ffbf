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
