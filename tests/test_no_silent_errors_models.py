"""No silent wrong answers in the models and the training loop (cnf.py, poisson.py, training.py).

Each test pins one hole from the library review (shared/reviews/library.md, section 1.9 and the
table's items 1, 4, 8 and 16): a result must be right, or refused with an error that names the
argument and the fix.
"""

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import neuralode as node
from neuralode.cnf import CNF, CNFDynamics
from neuralode.poisson import compensator, poisson_log_likelihood, simulate_thinning
from neuralode.train import NegativeLogLikelihood

F64 = torch.float64
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ------------------------------------------------------------------ CNF: Hutchinson noise per solve
def _hutchinson_cnf(adjoint: bool, **kwargs) -> CNF:
    torch.manual_seed(0)
    return CNF(CNFDynamics(2, hidden=(8,)).double(), trace="hutchinson", rtol=1e-7, atol=1e-7,
               adjoint=adjoint, **kwargs)


def _grad(cnf: CNF) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in cnf.parameters()])


# Calls made between log_prob(x) and its backward(): another batch of the same size (a wrong
# gradient without a word, before the fix), a batch of another size (a shape error), a sample.
INTERLEAVED = {
    "log_prob_same_batch": lambda cnf: cnf.log_prob(torch.randn(5, 2, dtype=F64)),
    "log_prob_other_batch": lambda cnf: cnf.log_prob(torch.randn(3, 2, dtype=F64)),
    "transform": lambda cnf: cnf.transform(torch.randn(5, 2, dtype=F64)),
    "sample": lambda cnf: cnf.sample(7),
}


@pytest.mark.parametrize("adjoint", [True, False], ids=["adjoint", "backprop"])
@pytest.mark.parametrize("call", list(INTERLEAVED))
def test_hutchinson_gradient_is_unchanged_by_a_solve_before_backward(adjoint, call):
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    grads = []
    for interleave in (False, True):
        cnf = _hutchinson_cnf(adjoint)
        torch.manual_seed(2)  # the same noise for log_prob(x)'s solve in both runs
        log_px = cnf.log_prob(x)
        if interleave:
            INTERLEAVED[call](cnf)  # e.g. a validation batch
        log_px.sum().backward()
        grads.append(_grad(cnf))
    assert torch.allclose(grads[1], grads[0], rtol=1e-10, atol=1e-12)


def test_hutchinson_adjoint_gradient_equals_backprop_with_the_same_noise():
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    grads = []
    for adjoint in (True, False):
        cnf = _hutchinson_cnf(adjoint)
        torch.manual_seed(2)
        cnf.log_prob(x).sum().backward()
        grads.append(_grad(cnf))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-8)


def test_cnf_reports_its_backward_nfe_to_fit():
    torch.manual_seed(0)
    model = NegativeLogLikelihood(CNF(CNFDynamics(2, hidden=(8,)), trace="hutchinson", rtol=1e-3, atol=1e-3))
    data = TensorDataset(torch.randn(8, 2), torch.zeros(8))
    history = node.fit(model, DataLoader(data, batch_size=4), epochs=1, loss_fn=lambda nll, _: nll.mean(),
                       optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), device="cpu", progress=False)
    assert all(n > 0 for n in history.batch_backward_nfe)


# ------------------------------------------------------------------------ solver settings reach odeint
def test_compensator_and_log_likelihood_forward_options_to_the_solver():
    # Euler with h = 0.25 on lambda(t) = 1 + t over [0, 1] is the left Riemann sum
    # 0.25 * (1 + 1.25 + 1.5 + 1.75) = 1.375, not the exact 1.5: the step size reached the solver.
    rate = lambda t: 1 + t  # noqa: E731
    euler = dict(method="euler", options={"step_size": 0.25})
    assert compensator(rate, 0.0, 1.0, **euler).item() == pytest.approx(1.375, abs=1e-12)
    assert poisson_log_likelihood(rate, [0.5], 0.0, 1.0, **euler).item() == pytest.approx(math.log(1.5) - 1.375,
                                                                                           abs=1e-12)
    wiggly = lambda t: 2 + torch.sin(40 * t)  # noqa: E731
    with pytest.raises(RuntimeError, match="max_num_steps=3"):
        compensator(wiggly, 0.0, 10.0, options={"max_num_steps": 3})
    with pytest.raises(RuntimeError, match="max_num_steps=3"):
        poisson_log_likelihood(wiggly, [1.0], 0.0, 10.0, options={"max_num_steps": 3})


def test_log_likelihood_names_an_unknown_solver_setting():
    with pytest.raises(TypeError, match="step_size"):
        poisson_log_likelihood(lambda t: 1 + t, [0.5], 0.0, 1.0, step_size=0.1)


@pytest.mark.parametrize("adjoint", [True, False], ids=["adjoint", "backprop"])
def test_cnf_forwards_options_to_the_solver(adjoint):
    torch.manual_seed(0)
    cnf = CNF(CNFDynamics(2, hidden=(8,)), method="euler", options={"step_size": 0.25}, adjoint=adjoint)
    cnf.log_prob(torch.randn(4, 2)).sum().backward()
    assert cnf.nfe == 4  # four Euler steps of 0.25 over [0, 1]
    if adjoint:
        assert cnf.backward_nfe == 4  # the backward solve takes the same options


@pytest.mark.parametrize("model", ["latent", "poisson"])
def test_latent_models_forward_options_to_the_solver(model):
    """Every model that solves takes ``options`` and hands it to odeint: a fixed step of 0.25 on [0, 1]
    is 4 Euler steps, 4 evaluations; a budget of one step is the solver's own error."""
    torch.manual_seed(0)
    t = torch.linspace(0.0, 1.0, 5)
    cls = node.LatentODE if model == "latent" else node.PoissonLatentODE
    euler = cls(method="euler", options={"step_size": 0.25})
    z0 = torch.randn(3, euler.latent_dim)
    if model == "latent":
        euler.latent_trajectory(z0, t[0], t)
    else:
        euler.trajectory_and_compensator(z0, t)
    assert euler.nfe == 4
    starved = cls(options={"max_num_steps": 1})
    with pytest.raises(RuntimeError, match="max_num_steps"):
        if model == "latent":
            starved.latent_trajectory(z0, t[0], t)
        else:
            starved.trajectory_and_compensator(z0, t)


def test_compensator_follows_the_intensity_dtype():
    # A float32 intensity used to meet a float64 state by default, and odeint refused it.
    a = torch.tensor([1.0, 2.0])
    value = compensator(lambda t: a * (1 + 0 * t), 0.0, 3.0)
    assert value.dtype == torch.float32 and torch.allclose(value, 3 * a)


# ------------------------------------------------------------------------------- thinning arguments
def test_thinning_refuses_a_negative_intensity_and_a_bad_window():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="negative"):
        simulate_thinning(lambda t: torch.sin(t), 0.0, 20.0, 1.0, generator=g)
    with pytest.raises(ValueError, match="elementwise"):
        simulate_thinning(lambda t: torch.ones(len(t), 2), 0.0, 20.0, 1.0, generator=g)
    with pytest.raises(ValueError, match="t0 < t1"):
        simulate_thinning(lambda t: torch.ones_like(t), 2.0, 1.0, 1.0, generator=g)


# --------------------------------------------------------------------------- fit: validation loss
def test_fit_validates_a_cnf_with_its_custom_loss():
    torch.manual_seed(0)
    model = NegativeLogLikelihood(CNF(CNFDynamics(2, hidden=(8,)), rtol=1e-4, atol=1e-4, adjoint=False))
    x = torch.randn(20, 2)
    train = DataLoader(TensorDataset(x[:12], torch.zeros(12)), batch_size=6)
    val_x = x[12:]  # 8 points in batches of 3, 3 and 2: the mean must weight by batch size
    val = DataLoader(TensorDataset(val_x, torch.zeros(8)), batch_size=3)
    history = node.fit(model, train, epochs=1, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                       val_loader=val, loss_fn=lambda nll, _: nll.mean(), device="cpu", progress=False)
    with torch.no_grad():
        expected = sum(model(b).sum().item() for b in val_x.split(3)) / len(val_x)
    assert history.epoch_val_loss == [pytest.approx(expected, rel=1e-6)]  # float32 rounding
    assert math.isnan(history.epoch_val_accuracy[0])  # not a classifier: no accuracy, not a made-up one


@pytest.mark.parametrize("loss", ["default", "label_smoothing"])
def test_fit_validation_loss_is_the_mean_over_the_validation_set(loss):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(27, 2), torch.randint(0, 3, (27,))
    loss_fn = {"default": torch.nn.functional.cross_entropy,
               "label_smoothing": lambda logits, y: torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)}
    kwargs = {} if loss == "default" else {"loss_fn": loss_fn[loss]}
    history = node.fit(model, DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8), epochs=1,
                       optimizer=torch.optim.SGD(model.parameters(), lr=0.1), device="cpu", progress=False,
                       val_loader=DataLoader(TensorDataset(x[16:], y[16:]), batch_size=4), **kwargs)
    with torch.no_grad():
        logits = model(x[16:])
    assert history.epoch_val_loss == [pytest.approx(loss_fn[loss](logits, y[16:]).item(), rel=1e-6)]
    assert history.epoch_val_accuracy == [pytest.approx((logits.argmax(1) == y[16:]).double().mean().item())]


def test_evaluate_refuses_a_loss_that_is_not_a_scalar():
    model = torch.nn.Linear(2, 3)
    loader = [(torch.randn(4, 2), torch.randint(0, 3, (4,)))]
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        node.evaluate(model, loader, loss_fn=lambda p, y: torch.nn.functional.cross_entropy(p, y, reduction="none"))


# ------------------------------------------------------------------ fit: iterables without a length
def _batches(n=3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 2, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(n)]


class _Reiterable:
    """A re-iterable stream of batches without ``__len__`` (like an IterableDataset's loader)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


@pytest.mark.parametrize("kind", ["generator", "reiterable"])
def test_fit_shows_progress_over_an_iterable_without_len(kind):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    batches = _batches()
    loader = (b for b in batches) if kind == "generator" else _Reiterable(batches)
    epochs = 1 if kind == "generator" else 2
    history = node.fit(model, loader, epochs=epochs, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       device="cpu", progress=True)
    assert len(history.batch_loss) == 3 * epochs


def test_fit_refuses_an_epoch_without_batches():
    # A generator is used up after one epoch: the second one would train on nothing and record
    # a loss of 0.0 without a word.
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no batches in epoch 2.*generator"):
        node.fit(model, (b for b in _batches()), epochs=2, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                 device="cpu", progress=False)


def test_validation_refuses_a_loader_without_examples():
    # Likewise for validation: the second epoch reported a loss and an accuracy of 0.0.
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no examples.*generator"):
        node.fit(model, _batches(), epochs=2, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                 val_loader=(b for b in _batches()), device="cpu", progress=False)
    with pytest.raises(ValueError, match="no examples"):
        node.evaluate(model, [])


def test_fit_refuses_a_max_batches_that_trains_nothing():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="max_batches must be a positive integer"):
        node.fit(model, _batches(), epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                 device="cpu", progress=False, max_batches=0)


# ----------------------------------------------------------------------------------- CUDA only
@cuda_only
def test_fit_resumes_on_cuda(tmp_path):
    # torch.load(map_location="cuda") used to move the RNG ByteTensors to the GPU, and
    # torch.set_rng_state only takes CPU ones.
    def run(stop=None):
        node.seed_everything(0)
        model = torch.nn.Linear(2, 2)
        data = TensorDataset(torch.randn(12, 2), torch.randint(0, 2, (12,)))
        loader = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))
        return node.fit(model, loader, epochs=2, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        device="cuda", checkpoint=tmp_path / "c.pt", progress=False, stop_after_epochs=stop)

    run(stop=1)
    assert len(run().epoch_train_loss) == 2


@cuda_only
def test_cnf_samples_on_cuda_with_a_cpu_generator():
    cnf = CNF(CNFDynamics(2, hidden=(8,)), trace="hutchinson").cuda()
    x = cnf.sample(4, generator=torch.Generator().manual_seed(0))  # CUDA generators raised before
    z0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(0)).cuda()  # the same draw as on the CPU
    assert x.device.type == "cuda" and torch.allclose(x, cnf.transform(z0)[0], atol=1e-5)
