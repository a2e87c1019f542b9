"""Per-phase constants of GR/DGR (docs/method.md §2), computed once before each phase.

Everything is indexed by class position (the classifier's class axis) over all ``C`` classes of the
run, so the arrays keep one shape for the whole run and can be fed to one compiled train step.
"""

import math

import flax.struct
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class PhaseConstants:
  """The inputs a phase's train step needs besides data and parameters.

  Attributes:
    old_classes: bool ``[C]``, classes of earlier phases.
    new_classes: bool ``[C]``, classes introduced in this phase.
    class_counts: float32 ``[C]``, the counts behind the prior π(t): ``min(N_c, M)`` for old classes,
      ``N_c`` for new ones, 0 for unseen classes.
    lost_counts: float32 ``[C]``, R_c = N_c − min(N_c, M) for old classes, 0 elsewhere.
    gamma: γ = exp(−N_seen / (N_seen + N_new)), the attenuation of the new classes' reweighting.
    kd_weight: λ = λ_b sqrt(N_seen / N_new) T² (0 in phase 0).
  """
  old_classes: jnp.ndarray
  new_classes: jnp.ndarray
  class_counts: jnp.ndarray
  lost_counts: jnp.ndarray
  gamma: jnp.ndarray
  kd_weight: jnp.ndarray


def phase_constants(train_counts: np.ndarray, num_old: int, num_new: int, memory_per_class: int,
                    kd_lambda_base: float = 0.7, temperature: float = 2.0) -> PhaseConstants:
  """Builds :class:`PhaseConstants` for a phase whose classes are positions ``[0, num_old + num_new)``.

  Args:
    train_counts: ``[C]`` N_c by class position: training images of class c in the phase where it
      was new (after any validation hold-out).
    num_old: number of old classes (positions ``[0, num_old)``).
    num_new: number of new classes (positions ``[num_old, num_old + num_new)``).
    memory_per_class: M, exemplars kept per old class.
    kd_lambda_base: λ_b.
    temperature: T of the distillation.

  Raises:
    ValueError: for counts that are not one non-negative number per class, class numbers that do
      not fit them, or ``memory_per_class < 1`` with old classes (a count of 0 would drop an old
      class from the prior-adjusted softmax as if it were unseen).
  """
  counts = np.asarray(train_counts, np.float64)
  if counts.ndim != 1 or not np.all(np.isfinite(counts)) or np.any(counts < 0):
    raise ValueError(f"train_counts must be one non-negative count per class ([C]); got shape "
                     f"{counts.shape} with values {counts.tolist()[:8]}")
  num_classes = counts.shape[0]
  if num_old < 0 or num_new < 1 or num_old + num_new > num_classes:
    raise ValueError(f"num_old={num_old} and num_new={num_new} do not fit the {num_classes} "
                     "classes of train_counts: need num_old >= 0, num_new >= 1 and "
                     "num_old + num_new <= len(train_counts)")
  if num_old and memory_per_class < 1:
    raise ValueError(f"memory_per_class={memory_per_class}: with old classes the memory must keep "
                     "at least 1 exemplar per class (M >= 1; docs/method.md §1)")
  position = np.arange(num_classes)
  old = position < num_old
  new = (position >= num_old) & (position < num_old + num_new)
  kept = np.minimum(counts, memory_per_class)
  n_seen = float(counts[old].sum())
  n_new = float(counts[new].sum())
  if n_new <= 0:
    raise ValueError(f"phase with {num_new} new classes has no training images")
  prior_counts = np.where(old, kept, np.where(new, counts, 0.0))
  lost = np.where(old, counts - kept, 0.0)
  gamma = math.exp(-n_seen / (n_seen + n_new))
  kd_weight = kd_lambda_base * math.sqrt(n_seen / n_new) * temperature**2 if num_old else 0.0
  return PhaseConstants(
      old_classes=jnp.asarray(old),
      new_classes=jnp.asarray(new),
      class_counts=jnp.asarray(prior_counts, jnp.float32),
      lost_counts=jnp.asarray(lost, jnp.float32),
      gamma=jnp.asarray(gamma, jnp.float32),
      kd_weight=jnp.asarray(kd_weight, jnp.float32))
