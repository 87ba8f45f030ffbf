import math

import pytest
import torch

from neuralode.poisson import compensator, poisson_log_likelihood, simulate_thinning


def rate(a, b):
    return lambda t: a + b * torch.sin(t)


def closed_form(events, a, b, t0, t1):
    # sum log(a + b sin t_i) - [a t - b cos t] from t0 to t1
    integral = a * (t1 - t0) - b * (math.cos(t1) - math.cos(t0))
    return sum(math.log(a + b * math.sin(t)) for t in events) - integral


def test_log_likelihood_matches_the_closed_form():
    events = [0.3, 1.7, 2.2, 5.9, 8.0]
    value = poisson_log_likelihood(rate(2.0, 1.5), events, 0.0, 10.0, rtol=1e-11, atol=1e-11)
    assert value.item() == pytest.approx(closed_form(events, 2.0, 1.5, 0.0, 10.0), abs=1e-8)


def test_compensator_matches_a_fine_riemann_sum():
    lam = lambda t: torch.exp(torch.sin(3 * t)) + t ** 2  # noqa: E731
    grid = torch.linspace(0.0, 2.0, 200_001, dtype=torch.float64)
    riemann = (lam((grid[1:] + grid[:-1]) / 2) * (grid[1] - grid[0])).sum()
    assert compensator(lam, 0.0, 2.0).item() == pytest.approx(riemann.item(), rel=1e-6)
    assert compensator(lam, 0.0, 2.0, rtol=1e-11, atol=1e-11).item() == pytest.approx(riemann.item(), rel=1e-9)


def test_no_events_and_gradients():
    a = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    value = poisson_log_likelihood(lambda t: a + 0 * t, [], 0.0, 3.0)
    value.backward()
    assert value.item() == pytest.approx(-6.0) and a.grad.item() == pytest.approx(-3.0)


def test_thinning_counts_match_the_integrated_rate():
    # Counts are Poisson(Lambda): over 400 seeded windows the mean is within 4 standard errors.
    a, b, t0, t1 = 2.0, 1.5, 0.0, 10.0
    big = a * (t1 - t0) - b * (math.cos(t1) - math.cos(t0))
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([len(simulate_thinning(rate(a, b), t0, t1, a + b, generator=g)) for _ in range(400)],
                          dtype=torch.float64)
    assert abs(counts.mean().item() - big) < 4 * math.sqrt(big / 400)
    assert counts.var().item() == pytest.approx(big, rel=0.25)  # Poisson: variance = mean


def test_maximum_likelihood_recovers_the_rate():
    g = torch.Generator().manual_seed(1)
    events = simulate_thinning(rate(6.0, 4.0), 0.0, 60.0, 10.0, generator=g)
    params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], lr=0.5, max_iter=40, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        lam = lambda t: torch.nn.functional.softplus(params[0]) + params[1] * torch.sin(t)  # noqa: E731
        loss = -poisson_log_likelihood(lam, events, 0.0, 60.0, rtol=1e-6, atol=1e-6)
        loss.backward()
        return loss

    optimizer.step(closure)
    a_hat, b_hat = torch.nn.functional.softplus(params[0]).item(), params[1].item()
    # 354 events: the Fisher information gives standard errors of about 0.32 for a and 0.44 for b.
    assert a_hat == pytest.approx(6.0, abs=3 * 0.32) and b_hat == pytest.approx(4.0, abs=3 * 0.44)


def test_bad_inputs():
    with pytest.raises(ValueError, match="t0 < t1"):
        poisson_log_likelihood(rate(1, 0), [], 1.0, 1.0)
    with pytest.raises(ValueError, match="every event must lie in"):
        poisson_log_likelihood(rate(1, 0), [2.0], 0.0, 1.0)
    with pytest.raises(ValueError, match="positive at every event"):
        poisson_log_likelihood(rate(0.0, 1.0), [4.0], 0.0, 5.0)
    with pytest.raises(ValueError, match="elementwise"):
        poisson_log_likelihood(lambda t: torch.ones(()), [1.0, 2.0], 0.0, 5.0)
    with pytest.raises(ValueError, match="rate_max"):
        simulate_thinning(rate(2.0, 1.5), 0.0, 10.0, 1.0, generator=torch.Generator().manual_seed(0))
