"""Class-incremental metrics (docs/method.md §6.8) from per-class correct counts.

Evaluation only accumulates, per phase t and class position k, how many test images were right
(:func:`per_class_correct`, jitted on device). Everything else is derived here in NumPy, so all
metric variants come from the same counts. Accuracies are in percent (0–100).

Conventions: row t = evaluation after phase t, column u = task u; task u owns class positions
``[Σ task_sizes[:u], Σ task_sizes[:u+1])``. Entries that do not exist yet (u > t) are NaN.
"""

import math
from collections.abc import Mapping
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Shot groups by training images per class (the usual LT split): many > 100, medium 20..100
# inclusive, few < 20.
MANY_SHOT_ABOVE = 100
FEW_SHOT_BELOW = 20


def per_class_correct(logits: jax.Array, labels: jax.Array, valid: jax.Array,
                      seen_mask: jax.Array, task_of_class: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-class correct counts of one batch, task-agnostic (TAg) and task-aware (TAw).

  TAg prediction = argmax of the logits over the seen classes (unseen set to −inf); TAw
  prediction = argmax over the classes of the label's own task (the task id is given).

  Args:
    logits: ``[B, C]`` raw logits.
    labels: ``[B]`` int class positions.
    valid: ``[B]`` bool, False for padding rows (ignored).
    seen_mask: ``[C]`` bool, classes of phases ≤ t.
    task_of_class: ``[C]`` int task of each class position.

  Returns:
    ``(correct_tag, correct_taw, count)``, each int32 ``[C]``: sums over the valid rows of each
    label class.
  """
  num_classes = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  seen_mask = seen_mask.astype(bool)
  tag_pred = jnp.argmax(jnp.where(seen_mask[None, :], logits, -jnp.inf), axis=-1)
  own_task = task_of_class[None, :] == task_of_class[labels][:, None]
  taw_pred = jnp.argmax(jnp.where(own_task & seen_mask[None, :], logits, -jnp.inf), axis=-1)
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32) * valid[:, None].astype(jnp.int32)
  tag = jnp.sum(one_hot * (tag_pred == labels)[:, None], axis=0)
  taw = jnp.sum(one_hot * (taw_pred == labels)[:, None], axis=0)
  return tag.astype(jnp.int32), taw.astype(jnp.int32), jnp.sum(one_hot, axis=0).astype(jnp.int32)


def _task_bounds(task_sizes: Sequence[int], num_classes: int) -> np.ndarray:
  sizes = [int(s) for s in task_sizes]
  if not sizes or any(s <= 0 for s in sizes) or sum(sizes) != num_classes:
    raise ValueError(f"task_sizes={list(task_sizes)} must be positive and sum to the number of "
                     f"classes K={num_classes} of the count arrays")
  return np.concatenate([[0], np.cumsum(sizes)])


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  """100 · num / den, NaN where den == 0 (no warning)."""
  num = np.asarray(num, np.float64)
  den = np.asarray(den, np.float64)
  return np.where(den > 0, 100.0 * num / np.where(den > 0, den, 1.0), np.nan)


def _check_counts(correct_tag, correct_taw, num_test, task_sizes):
  correct_tag = np.asarray(correct_tag, np.float64)
  correct_taw = np.asarray(correct_taw, np.float64)
  num_test = np.asarray(num_test, np.float64).reshape(-1)
  if correct_tag.ndim != 2 or correct_tag.shape != correct_taw.shape:
    raise ValueError(f"correct_tag {correct_tag.shape} and correct_taw {correct_taw.shape} must "
                     "both be [T, K]")
  if correct_tag.shape[1] != num_test.shape[0]:
    raise ValueError(f"correct counts have K={correct_tag.shape[1]} classes but num_test has "
                     f"{num_test.shape[0]}")
  bounds = _task_bounds(task_sizes, num_test.shape[0])
  if correct_tag.shape[0] != len(bounds) - 1:
    raise ValueError(f"correct counts have T={correct_tag.shape[0]} rows but task_sizes lists "
                     f"{len(bounds) - 1} tasks; pass one row per phase")
  return correct_tag, correct_taw, num_test, bounds


def accuracy_matrices(correct_tag: np.ndarray, correct_taw: np.ndarray, num_test: np.ndarray,
                      task_sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """TAg and TAw accuracy matrices ``[T, T]`` in percent.

  ``acc[t, u] = 100 · Σ_{k ∈ task u} correct[t, k] / Σ_{k ∈ task u} num_test[k]`` for u ≤ t
  (pooled over the task's test images), NaN for u > t (task not seen yet) or a task without
  test images.
  """
  correct_tag, correct_taw, num_test, bounds = _check_counts(correct_tag, correct_taw, num_test,
                                                             task_sizes)
  num_tasks = len(bounds) - 1
  sum_task = lambda a: np.add.reduceat(a, bounds[:-1], axis=-1)
  acc_tag = _ratio(sum_task(correct_tag), sum_task(num_test)[None, :])
  acc_taw = _ratio(sum_task(correct_taw), sum_task(num_test)[None, :])
  future = np.triu(np.ones((num_tasks, num_tasks), bool), k=1)
  acc_tag[future] = np.nan
  acc_taw[future] = np.nan
  return acc_tag, acc_taw


def forgetting(acc: np.ndarray) -> np.ndarray:
  """Forgetting ``f[t, u] = max_{u ≤ t' < t} acc[t', u] − acc[t, u]`` for u < t, NaN elsewhere.

  The best accuracy the task ever had before phase t minus its accuracy now (positive = forgot).
  Undefined (NaN) on and above the diagonal: a task cannot be forgotten in the phase it is learnt.
  """
  acc = np.asarray(acc, np.float64)
  num_tasks = acc.shape[0]
  out = np.full((num_tasks, num_tasks), np.nan)
  for t in range(1, num_tasks):
    for u in range(t):
      out[t, u] = np.max(acc[u:t, u]) - acc[t, u]
  return out


def class_forgetting(acc: np.ndarray) -> np.ndarray:
  """Per-class forgetting ``f[t, k] = max_{t' < t} acc[t', k] − acc[t, k]`` over an accuracy
  matrix ``[T, K]`` that is NaN where class (or task) k was not seen yet.

  The column-wise form of :func:`forgetting`: earlier phases where k was unseen are skipped, and
  f is NaN in the phase a class arrives (nothing earlier to forget) and wherever acc is NaN. On a
  square task matrix (NaN above the diagonal) it equals :func:`forgetting`; on per-class
  accuracies it shows which classes forget, e.g. those that lost most training data to the memory.
  """
  acc = np.asarray(acc, np.float64)
  best = np.full_like(acc, np.nan)
  if acc.shape[0] > 1:
    # Running max over the earlier phases; fmax skips NaN unless both sides are NaN.
    best[1:] = np.fmax.accumulate(acc[:-1], axis=0)
  return best - acc


def shot_groups(train_counts: np.ndarray) -> dict[str, np.ndarray]:
  """Bool masks over classes: many (> 100 training images), medium (20..100), few (< 20)."""
  counts = np.asarray(train_counts).reshape(-1)
  return {"many": counts > MANY_SHOT_ABOVE,
          "medium": (counts >= FEW_SHOT_BELOW) & (counts <= MANY_SHOT_ABOVE),
          "few": counts < FEW_SHOT_BELOW}


def to_json_compatible(value: Any) -> Any:
  """Recursively converts numpy / JAX values to plain JSON types; NaN and ±inf become None.

  Strict JSON has no NaN / Infinity, and e.g. forgetting is undefined for the first phase, so
  missing values are written as ``null``.
  """
  if isinstance(value, Mapping):
    return {str(k): to_json_compatible(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json_compatible(v) for v in value]
  if isinstance(value, (str, bool)) or value is None:
    return value
  if isinstance(value, np.generic):
    return to_json_compatible(value.item())
  if isinstance(value, int):
    return value
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if hasattr(value, "__array__"):  # np.ndarray, jax.Array
    return to_json_compatible(np.asarray(value).tolist())
  raise TypeError(f"cannot convert {type(value).__name__} to JSON")


def _mean(values: np.ndarray) -> float:
  values = np.asarray(values, np.float64)
  values = values[~np.isnan(values)]
  return float(np.mean(values)) if values.size else float("nan")


def summarize(correct_tag: np.ndarray, correct_taw: np.ndarray, num_test: np.ndarray,
              task_sizes: Sequence[int], train_counts: np.ndarray) -> dict[str, Any]:
  """Every metric of §6.8, JSON-ready (lists and floats, NaN → None). Percent throughout.

  Keys:
    acc_tag, acc_taw: ``[T][T]`` accuracy matrices (:func:`accuracy_matrices`).
    avg_acc_per_phase: ``A_t = mean_{u ≤ t} acc_tag[t, u]`` (unweighted over tasks; reference
      default). ``avg_acc_per_phase_taw``: the same on ``acc_taw``.
    avg_acc_per_phase_weighted: TAg accuracy over all seen test images of phase t pooled.
    average_incremental_accuracy (+ ``_weighted``, ``_taw``): mean of A_t over t = 0..T−1, the
      base phase included (the number papers report).
    last_accuracy (+ ``_weighted``, ``_taw``): A_{T−1}.
    forgetting: ``[T][T]`` TAg forgetting (:func:`forgetting`); average_forgetting: mean of
      ``f[T−1, u]`` over u < T−1 (None if T == 1).
    per_class_accuracy: final-phase TAg accuracy of each class position (``[K]``).
    shot_accuracy: final-phase TAg accuracy pooled over the test images of the many/medium/few
      classes (None for an empty group); shot_counts: classes per group.
  """
  correct_tag, correct_taw, num_test, bounds = _check_counts(correct_tag, correct_taw, num_test,
                                                             task_sizes)
  train_counts = np.asarray(train_counts).reshape(-1)
  if train_counts.shape[0] != num_test.shape[0]:
    raise ValueError(f"train_counts has {train_counts.shape[0]} classes but num_test has "
                     f"{num_test.shape[0]}; both are indexed by class position")
  acc_tag, acc_taw = accuracy_matrices(correct_tag, correct_taw, num_test, task_sizes)
  num_tasks = acc_tag.shape[0]
  per_phase = np.array([_mean(acc_tag[t, :t + 1]) for t in range(num_tasks)])
  per_phase_taw = np.array([_mean(acc_taw[t, :t + 1]) for t in range(num_tasks)])
  per_phase_w = np.array([_ratio(correct_tag[t, :bounds[t + 1]].sum(),
                                 num_test[:bounds[t + 1]].sum()) for t in range(num_tasks)])
  forget = forgetting(acc_tag)
  final = correct_tag[-1]
  groups = shot_groups(train_counts)
  shot_acc = {name: (_ratio(final[mask].sum(), num_test[mask].sum()) if mask.any() else np.nan)
              for name, mask in groups.items()}
  return to_json_compatible({
      "acc_tag": acc_tag,
      "acc_taw": acc_taw,
      "avg_acc_per_phase": per_phase,
      "avg_acc_per_phase_taw": per_phase_taw,
      "avg_acc_per_phase_weighted": per_phase_w,
      "average_incremental_accuracy": _mean(per_phase),
      "average_incremental_accuracy_weighted": _mean(per_phase_w),
      "average_incremental_accuracy_taw": _mean(per_phase_taw),
      "last_accuracy": per_phase[-1],
      "last_accuracy_weighted": per_phase_w[-1],
      "last_accuracy_taw": per_phase_taw[-1],
      "forgetting": forget,
      "average_forgetting": _mean(forget[-1, :-1]) if num_tasks > 1 else None,
      "per_class_accuracy": _ratio(final, num_test),
      "shot_accuracy": shot_acc,
      "shot_counts": {name: int(mask.sum()) for name, mask in groups.items()},
  })
