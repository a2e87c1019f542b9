"""Pure losses of GR/DGR (docs/method.md §3): prior-adjusted CE, distribution-aware KD, plain KD.

All functions take logits over *all* classes of the run (``[B, C]``) and select the classes they act
on with masks, so shapes never change between phases. Each returns a batch mean; the optional
``weights`` (``[B]``, 0/1) drop the padding rows of a fixed-size last batch from that mean.
This module imports nothing from gr_jax and can be copied alone.
"""

from typing import Optional

import jax
import jax.numpy as jnp

# A finite "minus infinity": masked entries vanish from softmaxes without 0·∞ = NaN in gradients.
_MASKED = -1e30


def _batch_mean(per_example: jax.Array, weights: Optional[jax.Array]) -> jax.Array:
  if weights is None:
    return jnp.mean(per_example)
  weights = weights.astype(jnp.float32)
  return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def log_prior(class_counts: jax.Array) -> jax.Array:
  """log π with π = counts / Σ counts; classes with count 0 (unseen) get a huge negative value."""
  counts = jnp.asarray(class_counts, jnp.float32)
  total = jnp.sum(counts)
  return jnp.where(counts > 0, jnp.log(jnp.where(counts > 0, counts, 1.0) / total), _MASKED)


def prior_adjusted_cross_entropy(logits: jax.Array, labels: jax.Array, class_counts: jax.Array,
                                 weights: Optional[jax.Array] = None) -> jax.Array:
  r"""L_CE = mean_b CE(z_b + log π, y_b) over the seen classes (those with a positive count).

  π(t) = counts / Σ counts, with counts ``min(N_c, M)`` for old classes and ``N_c`` for new ones;
  unseen classes (count 0) are excluded from the softmax. Adding log π is the logit adjustment of
  Menon et al. (2021) applied at training time only: predictions use the raw logits. Passing counts
  that are equal for all seen classes gives the plain CE over the seen classes (the "no logit prior"
  ablation).

  Args:
    logits: ``[B, C]`` raw logits z.
    labels: ``[B]`` int class indices (positions in the classifier).
    class_counts: ``[C]`` counts (any positive scale); 0 marks an unseen class.
    weights: optional ``[B]`` example weights (0 for padding).
  """
  adjusted = logits.astype(jnp.float32) + log_prior(class_counts)
  log_p = jax.nn.log_softmax(adjusted, axis=-1)
  nll = -jnp.take_along_axis(log_p, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return _batch_mean(nll, weights)


def _masked_log_softmax(x: jax.Array, mask: jax.Array) -> jax.Array:
  return jax.nn.log_softmax(jnp.where(mask, x, _MASKED), axis=-1)


def _soft_cross_entropy(target_logp: jax.Array, logp: jax.Array, mask: jax.Array) -> jax.Array:
  """−Σ_c p_c log q_c over the masked classes, per example."""
  return -jnp.sum(jnp.where(mask, jnp.exp(target_logp) * logp, 0.0), axis=-1)


def knowledge_distillation(student_logits: jax.Array, teacher_logits: jax.Array,
                           old_classes: jax.Array, temperature: float = 2.0,
                           weights: Optional[jax.Array] = None) -> jax.Array:
  r"""Plain KD over the old classes: −mean_b Σ_c softmax(ẑ/T)_c log_softmax(z/T)_c.

  ``teacher_logits`` ẑ receive no gradient. The T² factor is left to the caller's KD weight λ.
  """
  teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
  student = student_logits.astype(jnp.float32) / temperature
  per_example = _soft_cross_entropy(_masked_log_softmax(teacher, old_classes),
                                    _masked_log_softmax(student, old_classes), old_classes)
  return _batch_mean(per_example, weights)


def lost_count_entropy(lost_counts: jax.Array, old_classes: jax.Array) -> jax.Array:
  r"""H = −Σ p log p / log|C_old| with p = (R + 0.001) / Σ (R + 0.001) over the old classes.

  H ∈ [0, 1]: 1 when every old class lost the same amount of data (then DAKD is plain KD), small
  when the loss is concentrated on a few classes. H = 1 when no class lost data or |C_old| ≤ 1.
  """
  r = jnp.where(old_classes, jnp.asarray(lost_counts, jnp.float32) + 1e-3, 0.0)
  p = r / jnp.sum(r)
  entropy = -jnp.sum(jnp.where(old_classes, p * jnp.log(jnp.where(old_classes, p, 1.0)), 0.0))
  n_old = jnp.sum(old_classes)
  lost_any = jnp.any(jnp.where(old_classes, lost_counts, 0) > 0)
  h = entropy / jnp.log(jnp.maximum(n_old, 2).astype(jnp.float32))
  return jnp.where(lost_any & (n_old > 1), jnp.clip(h, 0.0, 1.0), 1.0)


def distribution_aware_kd(student_logits: jax.Array, teacher_logits: jax.Array,
                          old_classes: jax.Array, lost_counts: jax.Array,
                          temperature: float = 2.0,
                          weights: Optional[jax.Array] = None) -> jax.Array:
  r"""Distribution-aware KD (DAKD), docs/method.md §3, over the old classes only.

  With R_c the training images of old class c that are no longer available (N_c − min(N_c, M)),
  H = :func:`lost_count_entropy` and w = R / ‖R‖₂::

    z' = w ⊙ z + (1 − w) ⊙ ẑ
    L_DAKD = −mean_b Σ_c softmax(ẑ/T)_c [H log_softmax(z/T)_c + (1 − H) log_softmax(z'/T)_c]

  Classes that lost much data are distilled through logits that lean on the student, the others
  through the teacher's. When no old class lost data (R = 0) this is exactly plain KD (the reference
  implementation divides by ‖R‖ = 0 there and produces NaN). The caller multiplies by
  λ = λ_b sqrt(N_seen / N_new) T².
  """
  teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  student = student_logits.astype(jnp.float32)
  lost = jnp.where(old_classes, jnp.asarray(lost_counts, jnp.float32), 0.0)
  norm = jnp.sqrt(jnp.sum(lost * lost))
  w = jnp.where(norm > 0, lost / jnp.where(norm > 0, norm, 1.0), 0.0)
  h = lost_count_entropy(lost_counts, old_classes)
  mixed = w * student + (1.0 - w) * teacher

  target = _masked_log_softmax(teacher / temperature, old_classes)
  plain = _soft_cross_entropy(target, _masked_log_softmax(student / temperature, old_classes),
                              old_classes)
  aware = _soft_cross_entropy(target, _masked_log_softmax(mixed / temperature, old_classes),
                              old_classes)
  return _batch_mean(h * plain + (1.0 - h) * aware, weights)
