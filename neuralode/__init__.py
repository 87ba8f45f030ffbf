"""neuralode: the small, tested library behind the Neural ODE book.

The public API, re-exported here and nothing else.
"""

import importlib as _importlib

from . import (adjoint, cnf, data, densities, distributed, events, exercises, flows, images, latent, ledger,
               matching, nets, poisson, stats, training)
from ._odeint import METHODS, SolverStats, odeint
from .adjoint import AdjointStats, odeint_adjoint
from .events import odeint_event
from .reversible import ReversibleStats, odeint_reversible
from .cnf import (CNF, CNFDynamics, ConcatSquashLinear, GatedPlanarDynamics, RNODETerms, divergence_exact,
                  divergence_hutchinson)
from .flows import PlanarFlow
from .latent import LatentODE, PoissonLatentODE, RecognitionRNN, RNNBaseline
from .poisson import compensator, poisson_log_likelihood, simulate_thinning
from ._methods import TABLEAUS
from ._tableaus import ButcherTableau
from ._rosenbrock import RosenbrockTableau
from .nets import (Augment, ConcatConv2d, ConcatLinear, ConvODEFunc, MLPDynamics, ODEBlock, ResBlock, TiedResNet,
                   count_parameters, make_classifier)
from .training import (PROFILES, History, checkpoint_dir, default_device, evaluate, fit, resolve_profile,
                       saved_tensor_bytes, seed_everything)

__version__ = "0.1.0"

__all__ = [
    "odeint", "odeint_adjoint", "odeint_event", "odeint_reversible", "METHODS", "SolverStats", "AdjointStats", "ReversibleStats", "ButcherTableau", "RosenbrockTableau", "TABLEAUS",
    "ConcatLinear", "MLPDynamics", "ODEBlock", "Augment", "ConcatConv2d", "ConvODEFunc", "ResBlock", "TiedResNet",
    "make_classifier", "count_parameters",
    "CNF", "CNFDynamics", "ConcatSquashLinear", "GatedPlanarDynamics", "RNODETerms", "divergence_exact",
    "divergence_hutchinson", "PlanarFlow", "poisson_log_likelihood", "compensator", "simulate_thinning",
    "LatentODE", "PoissonLatentODE", "RecognitionRNN", "RNNBaseline",
    "PROFILES", "resolve_profile", "default_device", "seed_everything", "saved_tensor_bytes",
    "checkpoint_dir", "fit", "evaluate", "History",
    "adjoint", "cnf", "data", "densities", "distributed", "events", "exercises", "flows", "images", "latent", "ledger", "matching", "nets", "plotting", "poisson", "stats",
    "training",
]

# Submodules loaded on first access (PEP 562), so that ``import neuralode`` imports no plotting
# library: ``node.plotting.vector_field(...)``, ``from neuralode import plotting`` and
# ``import neuralode.plotting`` all still work, and pull in matplotlib only then.
_LAZY_SUBMODULES = ("plotting",)


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        module = _importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module  # the import already binds it; later accesses skip this hook
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
