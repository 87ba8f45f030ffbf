"""neuralode: the small, tested library behind the Neural ODE book.

The public API, re-exported here and nothing else.
"""

from . import adjoint, data, exercises, nets, plotting, training
from ._odeint import METHODS, SolverStats, odeint
from .adjoint import AdjointStats, odeint_adjoint
from ._tableaus import TABLEAUS, ButcherTableau
from .nets import Augment, ConcatLinear, MLPDynamics, ODEBlock
from .training import PROFILES, default_device, resolve_profile, saved_tensor_bytes, seed_everything

__version__ = "0.1.0"

__all__ = [
    "odeint", "odeint_adjoint", "METHODS", "SolverStats", "AdjointStats", "ButcherTableau", "TABLEAUS",
    "ConcatLinear", "MLPDynamics", "ODEBlock", "Augment",
    "PROFILES", "resolve_profile", "default_device", "seed_everything", "saved_tensor_bytes",
    "adjoint", "data", "exercises", "nets", "plotting", "training",
]
