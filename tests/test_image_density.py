"""Image densities (neuralode.images): dequantization, the logit transform, bits per dimension,
pooling to fewer pixels, the dequantized data set and the convolutional CNF dynamics."""

import math

import pytest
import torch

from neuralode.cnf import CNF, divergence_exact, divergence_hutchinson, sample_noise, standard_normal_log_prob
from neuralode.images import (DEFAULT_ALPHA, ConvCNFDynamics, Dequantized, GaussianCNF, bits_per_dim, dequantize_logit,
                              logit_inverse, pool_levels)
from problems import DEVICES

DTYPES = [torch.float32, torch.float64]


def _levels_and_noise(B, D, K, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(0, K, (B, D), generator=g).to(dtype=dtype, device=device)
    u = torch.rand(B, D, generator=g, dtype=dtype).to(device)
    return n, u


def _pushforward_log_density(y, alpha):
    """log p_Y(y) when v is uniform on [0, 1)^D: sum_i log(sigmoid(y_i)(1 - sigmoid(y_i))/(1 - 2 alpha)),
    written from y alone (not from s), so that it checks dequantize_logit's log-determinant."""
    return (torch.nn.functional.logsigmoid(y) + torch.nn.functional.logsigmoid(-y)
            - math.log(1 - 2 * alpha)).sum(dim=1)


def _uniform_bits(dequantize, bpd, K, alpha, dtype, device, D=12):
    """bits/dim that the uniform density on the unit cube gets through the whole pipeline: must be log2 K."""
    n, u = _levels_and_noise(64, D, K, dtype, device)
    y, log_det = dequantize(n, u, K, alpha)
    return bpd(_pushforward_log_density(y, alpha), log_det, D, K)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,alpha", [(256, DEFAULT_ALPHA), (256, 1e-6), (17, 0.05), (2, 0.0)])
def test_the_uniform_density_scores_exactly_log2_K_bits_per_dim(K, alpha, dtype, device):
    bits = _uniform_bits(dequantize_logit, bits_per_dim, K, alpha, dtype, device)
    assert bits.dtype == dtype and bits.device.type == device.type and bits.shape == (64,)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(bits, torch.full_like(bits, math.log2(K)), rtol=0, atol=tol)


def test_the_pushforward_density_integrates_to_one_on_the_logit_image():
    # The closed form used above is a density: its integral over [logit(alpha), logit(1 - alpha)] is 1.
    for alpha in (0.05, 1e-3):
        lo, hi = math.log(alpha / (1 - alpha)), math.log((1 - alpha) / alpha)
        y = torch.linspace(lo, hi, 200001, dtype=torch.float64)[:, None]
        mass = torch.trapezoid(_pushforward_log_density(y, alpha).exp(), y[:, 0])
        assert abs(mass.item() - 1) < 1e-8, (alpha, mass.item())


def _wrong_sign_bits(log_p_y, log_det, dim, levels):
    return -(log_p_y - log_det - dim * math.log(levels)) / (dim * math.log(2))


def _dequantize_without_alpha_term(n, u, levels, alpha=DEFAULT_ALPHA):
    y, log_det = dequantize_logit(n, u, levels, alpha)
    return y, log_det - n.shape[1] * math.log(1 - 2 * alpha)


def _dequantize_forgetting_K(n, u, levels, alpha=DEFAULT_ALPHA):
    y, log_det = dequantize_logit(n, u, levels, alpha)
    return y, log_det + n.shape[1] * math.log(levels)


@pytest.mark.parametrize("dequantize,bpd", [(dequantize_logit, _wrong_sign_bits),
                                            (_dequantize_without_alpha_term, bits_per_dim),
                                            (_dequantize_forgetting_K, bits_per_dim)],
                         ids=["bpd-wrong-sign", "logdet-missing-alpha", "logdet-of-n-plus-u-not-v"])
def test_the_uniform_check_catches_plausible_bugs(dequantize, bpd):
    bits = _uniform_bits(dequantize, bpd, 256, DEFAULT_ALPHA, torch.float64, torch.device("cpu"))
    assert (bits - 8).abs().min() > 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_log_determinant_matches_autograd(dtype):
    K, alpha, D = 256, 0.05, 5
    n, u = _levels_and_noise(3, D, K, dtype, torch.device("cpu"), seed=1)
    _, log_det = dequantize_logit(n, u, K, alpha)
    for b in range(3):
        v = ((n[b] + u[b]) / K).requires_grad_(True)
        J = torch.autograd.functional.jacobian(
            lambda v: dequantize_logit(n[b][None], (v * K - n[b])[None], K, alpha)[0][0], v)
        expected = torch.linalg.slogdet(J.to(torch.float64))[1].to(dtype)
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(log_det[b], expected, rtol=0, atol=tol)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_inverse_inverts(dtype, device):
    n, u = _levels_and_noise(16, 30, 256, dtype, device)
    for alpha in (0.05, 1e-3):
        y, _ = dequantize_logit(n, u, 256, alpha)
        v = logit_inverse(y, alpha)
        assert v.dtype == dtype and v.device.type == device.type
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(v, (n + u) / 256, rtol=0, atol=tol)
        # and the grey levels come back exactly
        assert torch.equal((v * 256).floor().clamp(0, 255), n) or dtype == torch.float32


def test_integer_levels_follow_the_noise_dtype_and_bad_input_is_refused():
    n = torch.randint(0, 256, (4, 6), dtype=torch.uint8)
    y, log_det = dequantize_logit(n, torch.rand(4, 6, dtype=torch.float64), 256)
    assert y.dtype == log_det.dtype == torch.float64
    with pytest.raises(ValueError, match="alpha"):
        dequantize_logit(n, torch.rand(4, 6), 256, alpha=0.5)
    with pytest.raises(ValueError, match="levels"):
        dequantize_logit(n, torch.rand(4, 6), 1)
    with pytest.raises(ValueError, match="same shape"):
        dequantize_logit(n, torch.rand(4, 5), 256)
    with pytest.raises(ValueError, match="dim"):
        bits_per_dim(torch.zeros(2), torch.zeros(2), 0, 256)


def test_pool_levels_averages_blocks_and_rounds():
    n = torch.tensor([[[0, 0, 255, 255], [0, 1, 254, 254], [10, 20, 0, 0], [30, 40, 0, 3]]], dtype=torch.uint8)
    pooled = pool_levels(n, 2)
    assert pooled.dtype == torch.uint8 and pooled.shape == (1, 2, 2)
    assert pooled.tolist() == [[[0, 254], [25, 1]]]   # 0.25 -> 0, 254.5 -> 254 (half to even), 25, 0.75 -> 1
    as_float = pool_levels(n.double().unsqueeze(1), 2)
    assert as_float.dtype == torch.float64 and as_float.shape == (1, 1, 2, 2)
    with pytest.raises(ValueError, match="divisible"):
        pool_levels(torch.zeros(1, 5, 5), 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantized_draws_fresh_noise_in_logit_space(dtype):
    n, _ = _levels_and_noise(10, 8, 256, dtype, torch.device("cpu"))
    data = Dequantized(n, 256, 0.05, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([0, 3, 3])
    a, b = data[idx], data[idx]
    assert a.shape == (3, 8) and a.dtype == dtype and len(data) == 10 and data.device == n.device
    assert not torch.equal(a, b)   # new noise at every access
    v = logit_inverse(a, 0.05)
    assert ((v * 256).floor() == n[idx]).all()   # the noise stays inside each pixel's cube
    shifted = Dequantized(n, 256, 0.05, transform=lambda y: y + 1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted[idx], a + 1)
    with pytest.raises(ValueError, match="floating"):
        Dequantized(n.long(), 256)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_cnf_dynamics_shapes_and_an_untrained_flow_is_the_identity(dtype, device):
    torch.manual_seed(0)
    f = ConvCNFDynamics(5, 4).to(device=device, dtype=dtype)
    z = torch.randn(3, 25, dtype=dtype, device=device)
    out = f(torch.tensor(0.3, dtype=dtype, device=device), z)
    assert out.shape == (3, 25) and out.dtype == dtype and out.device.type == device.type
    assert f.dim == 25
    cnf = CNF(f, trace="exact", adjoint=False)   # the last layer starts at zero: f = 0, log p = log N(x)
    torch.testing.assert_close(cnf.log_prob(z), standard_normal_log_prob(z))


def test_conv_cnf_dynamics_divergence_exact_against_hutchinson_mean():
    # On a tiny image, the mean of many Hutchinson estimates is within a few standard errors of
    # the exact trace, and the trace is not trivially zero (the last layer is made non-zero).
    torch.manual_seed(1)
    f = ConvCNFDynamics(4, 3).double()
    torch.nn.init.normal_(f.convs[-1].conv.weight, std=0.3)
    z = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.5, dtype=torch.float64)
    out = f(t, z)
    exact = divergence_exact(out, z).detach()
    jac = torch.stack([torch.autograd.functional.jacobian(lambda x: f(t, x[None])[0], z[b].detach()) for b in range(2)])
    torch.testing.assert_close(exact, torch.diagonal(jac, dim1=1, dim2=2).sum(1), rtol=1e-10, atol=1e-10)
    M = 4000
    zz = z.detach().repeat(M, 1).requires_grad_(True)
    est = divergence_hutchinson(f(t, zz), zz, sample_noise(zz, "rademacher", torch.Generator().manual_seed(2)))
    est = est.detach().view(M, 2)
    se = est.std(0) / math.sqrt(M)
    assert exact.abs().min() > 10 * se.max()
    assert ((est.mean(0) - exact).abs() < 4 * se).all(), (est.mean(0), exact, se)


def _random_gaussian(D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, generator=g, dtype=dtype)
    return torch.randn(D, generator=g, dtype=dtype), A @ A.T / D + 0.1 * torch.eye(D, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gaussian_cnf_starts_at_the_gaussians_log_density(dtype):
    torch.manual_seed(0)
    mean, cov = _random_gaussian(16, dtype)
    model = GaussianCNF(CNF(ConvCNFDynamics(4, 3), trace="hutchinson", adjoint=False), mean, cov).to(dtype)
    y = torch.randn(5, 16, dtype=dtype) * 2
    expected = torch.distributions.MultivariateNormal(mean, cov).log_prob(y)
    got = model.log_prob(y)
    assert got.dtype == dtype and got.shape == (5,)
    single = dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5 if single else 1e-10, atol=1e-4 if single else 1e-9)
    samples = model.sample(20000, generator=torch.Generator().manual_seed(1))
    assert samples.dtype == dtype and samples.shape == (20000, 16)
    assert (torch.cov(samples.T.double()) - cov.double()).abs().max() < 0.1
    assert (samples.double().mean(0) - mean.double()).abs().max() < 0.05


def test_gaussian_cnf_log_density_is_the_change_of_variables_through_a_nonzero_flow():
    # With a trained-looking (non-zero) CNF the composition still integrates the right log-determinant:
    # it equals the CNF's own log_prob with N(0, I) replaced by N(0, R) and the standardisation's -sum log sigma.
    torch.manual_seed(2)
    f = ConvCNFDynamics(3, 2).double()
    torch.nn.init.normal_(f.convs[-1].conv.weight, std=0.2)
    cnf = CNF(f, trace="exact", rtol=1e-9, atol=1e-9, adjoint=False)
    mean, cov = _random_gaussian(9, torch.float64, seed=3)
    model = GaussianCNF(cnf, mean, cov)
    y = torch.randn(4, 9, dtype=torch.float64)
    x = (y - mean) / cov.diagonal().sqrt()
    z0, _ = cnf.with_(t0=1.0, t1=0.0).transform(x)  # the flow backwards, from x at t1 to z0 at t0
    corr = cov / cov.diagonal().sqrt()[:, None] / cov.diagonal().sqrt()[None, :]
    expected = (cnf.log_prob(x) - standard_normal_log_prob(z0)
                + torch.distributions.MultivariateNormal(torch.zeros(9, dtype=torch.float64), corr).log_prob(z0)
                - cov.diagonal().sqrt().log().sum())
    torch.testing.assert_close(model.log_prob(y), expected, rtol=1e-7, atol=1e-7)
