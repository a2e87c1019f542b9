"""Exemplar memory selection (docs/method.md §6.6): herding, or a random subset, per class.

The memory is stored as dataset indices (``ids``), −1 marking an empty slot, so it is a small
int array that lives in the train state and is checkpointed with it.
"""

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("herding", "random")
# Per-class row counts are padded up to a multiple of this, so phases whose largest class differs
# slightly reuse the same compiled herding program.
_PAD_ROWS = 64


def herding_selection(features: jax.Array, valid: jax.Array, m: int) -> jax.Array:
  r"""Greedy herding (iCaRL; Welling 2009) over the valid rows of ``features``.

  With ``f_i = x_i / ‖x_i‖₂`` and ``μ = mean_{valid} f_i``, step k = 0..m−1 picks the valid,
  not yet picked row minimising ``‖μ − (f_i + Σ_{selected} f) / (k + 1)‖₂``: the running mean of
  the exemplars follows the class mean as closely as possible. Ties go to the lowest row (as in
  the reference's strict ``<`` scan). Rows are never picked twice; once the valid rows run out
  the remaining slots are −1.

  Args:
    features: ``[n, D]`` raw features (normalised here; zero rows stay zero).
    valid: ``[n]`` bool, False for padding rows.
    m: number of exemplars to pick (static).

  Returns:
    int32 ``[m]`` row indices in herding order, −1 padded.
  """
  f = features.astype(jnp.float32)
  f = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
  f = jnp.where(valid[:, None], f, 0.0)
  mu = jnp.sum(f, axis=0) / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)

  def body(k, carry):
    available, total, chosen = carry
    diff = mu[None, :] - (f + total[None, :]) / (k + 1).astype(jnp.float32)
    dist = jnp.sum(diff * diff, axis=-1)
    dist = jnp.where(available, dist, jnp.inf)
    pick = jnp.argmin(dist).astype(jnp.int32)
    ok = jnp.any(available)
    total = jnp.where(ok, total + f[pick], total)
    available = available.at[pick].set(jnp.where(ok, False, available[pick]))
    chosen = chosen.at[k].set(jnp.where(ok, pick, -1))
    return available, total, chosen

  init = (valid.astype(bool), jnp.zeros(f.shape[1:], jnp.float32), jnp.full((m,), -1, jnp.int32))
  return jax.lax.fori_loop(0, m, body, init)[2]


@functools.partial(jax.jit, static_argnums=2)
def _herding_batched(features: jax.Array, valid: jax.Array, m: int) -> jax.Array:
  return jax.vmap(herding_selection, in_axes=(0, 0, None))(features, valid, m)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _uniform_per_class(key: jax.Array, num_classes: int, n: int) -> jax.Array:
  return jax.vmap(lambda k: jax.random.uniform(k, (n,)))(jax.random.split(key, num_classes))


def select_exemplars(features: np.ndarray, labels: np.ndarray, ids: np.ndarray,
                     classes: Sequence[int], per_class: int, method: str = "herding",
                     key: Optional[jax.Array] = None) -> np.ndarray:
  """Exemplars of each class in ``classes``, as dataset indices.

  Rows are grouped by class and padded to a common size; herding runs for all classes at once
  (a jitted ``vmap`` of :func:`herding_selection`). A class with fewer than ``per_class`` rows
  keeps all of them (herding order) followed by −1 slots.

  Args:
    features: ``[N, D]`` features of the candidate images (test transform, inference mode).
    labels: ``[N]`` class id of each row (same id space as ``classes``).
    ids: ``[N]`` dataset index of each row; this is what gets stored.
    classes: the classes to select for, in output-row order.
    per_class: exemplars per class M (positive int).
    method: ``'herding'`` or ``'random'`` (uniform subset of size min(n_c, M), order random).
    key: PRNG key, required for ``'random'``.

  Returns:
    int64 ``[len(classes), per_class]`` dataset indices, −1 for empty slots.

  Raises:
    ValueError: bad ``per_class``, unknown ``method``, mismatched lengths, missing ``key`` for
      ``'random'``, or a class in ``classes`` with no rows.
  """
  if isinstance(per_class, (bool, np.bool_)) or not isinstance(per_class, (int, np.integer)) \
      or per_class <= 0:
    raise ValueError(f"per_class={per_class!r}: the exemplar budget must be a positive integer "
                     "(images kept per class, 20 in the paper)")
  per_class = int(per_class)
  if method not in METHODS:
    raise ValueError(f"unknown exemplar selection method {method!r}; valid: {', '.join(METHODS)}")
  features = np.asarray(features)
  labels = np.asarray(labels).reshape(-1)
  ids = np.asarray(ids).reshape(-1)
  if features.ndim != 2 or not (features.shape[0] == labels.shape[0] == ids.shape[0]):
    raise ValueError(f"features {features.shape}, labels {labels.shape} and ids {ids.shape} must "
                     "be [N, D], [N] and [N] with the same N")
  classes = [int(c) for c in classes]
  rows = [np.flatnonzero(labels == c) for c in classes]
  empty = [c for c, r in zip(classes, rows) if r.size == 0]
  if empty:
    raise ValueError(f"classes {empty} have no rows to select exemplars from; pass only classes "
                     "present in labels (check the class order / label positions)")
  out = np.full((len(classes), per_class), -1, np.int64)
  if not classes:
    return out

  if method == "random" and key is None:
    raise ValueError("method='random' needs a PRNG key: pass key=jax.random.key(seed)")
  n_max = -(-max(r.size for r in rows) // _PAD_ROWS) * _PAD_ROWS
  if method == "random":
    # A uniformly random order of each class's rows: sort i.i.d. uniforms (one key per class).
    noise = np.asarray(_uniform_per_class(key, len(classes), n_max))
    for i, r in enumerate(rows):
      order = np.argsort(noise[i, :r.size], kind="stable")[:per_class]
      out[i, :order.size] = ids[r[order]]
    return out

  feats = np.zeros((len(classes), n_max, features.shape[1]), np.float32)
  valid = np.zeros((len(classes), n_max), bool)
  for i, r in enumerate(rows):
    feats[i, :r.size] = features[r]
    valid[i, :r.size] = True
  picked = np.asarray(_herding_batched(jnp.asarray(feats), jnp.asarray(valid), per_class))
  for i, r in enumerate(rows):
    sel = picked[i]
    out[i] = np.where(sel >= 0, ids[r[np.maximum(sel, 0)]], -1)
  return out
