"""gr_jax: Gradient Reweighting for imbalanced class-incremental learning in JAX.

The reweighting transform and the losses are pure and import nothing else from gr_jax, so they can
be used in any JAX training loop; the rest of the package is the class-incremental trainer.
"""

from gr_jax.losses import distribution_aware_kd
from gr_jax.losses import knowledge_distillation
from gr_jax.losses import log_prior
from gr_jax.losses import lost_count_entropy
from gr_jax.losses import prior_adjusted_cross_entropy
from gr_jax.phase_constants import phase_constants
from gr_jax.phase_constants import PhaseConstants
from gr_jax.reweight import gradient_reweighting
from gr_jax.reweight import GradientReweightingState
from gr_jax.reweight import reweighting_factors
from gr_jax.reweight import ReweightingFactors

__version__ = "0.1.0"

__all__ = [
    "distribution_aware_kd", "gradient_reweighting", "GradientReweightingState",
    "knowledge_distillation", "log_prior", "lost_count_entropy", "phase_constants",
    "PhaseConstants", "prior_adjusted_cross_entropy", "reweighting_factors", "ReweightingFactors",
    "run",
]


def __getattr__(name):
  """``gr_jax.run`` loads the trainer (Orbax, data readers) only when asked for."""
  if name == "run":
    from gr_jax.trainer import run  # pylint: disable=g-import-not-at-top
    return run
  raise AttributeError(f"module 'gr_jax' has no attribute {name!r}")
