"""Per-class gradient reweighting of a linear classifier (GR and decoupled DGR) as an optax transform.

He & Zhu, "Gradient Reweighting: Towards Imbalanced Class-Incremental Learning", CVPR 2024
(arXiv 2402.18528), §3.2–3.3; the exact rules gr_jax follows are in ``docs/method.md`` §4.

The transform rescales, class by class, the gradient rows of a classifier (the columns of a Flax
``Dense`` kernel ``[D, C]`` -- the class axis is the last axis -- and the entries of its bias) so that
classes that have accumulated large gradients slow down and rarely-updated classes keep their pace.
Every leaf that is not a classifier leaf passes through bit-identical, so the transform can sit at
the head of any ``optax.chain``. This module imports nothing from gr_jax and can be copied alone.
"""

from typing import Any, Callable, NamedTuple, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

ClassifierSelector = Union[None, Any, Callable[[optax.Params], Any]]


class GradientReweightingState(NamedTuple):
  """State of :func:`gradient_reweighting`; re-``init`` it at the start of every phase.

  Attributes:
    cumulative_norms: Φ, float32 ``[C]``: the sum over this phase's steps of each class's CE
      gradient-row norm ``g_c``. Classes that were never seen stay at 0.
    class_scale: the last step's per-class factor ``s_c`` applied to the CE gradient rows (α for
      intra-phase GR, α·r for DGR; 0 for unseen classes). Kept for logging and tests.
    kd_scale: the last step's β, the factor of the KD gradient rows of old classes (0 without KD).
  """
  cumulative_norms: jax.Array
  class_scale: jax.Array
  kd_scale: jax.Array


def _mask_value(mask: Any, path: tuple[Any, ...]) -> bool:
  """The mask's bool for the params leaf at ``path``, following the path only as deep as the mask.

  Walking by key path (not by tree structure) is what lets the mask be a prefix of the params, as in
  ``optax.masked``, and a plain dict match a flax ``FrozenDict`` (both flatten to ``DictKey``s).
  """
  node = mask
  for depth, key in enumerate(path):
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(node)):
      break
    try:
      if isinstance(key, jax.tree_util.DictKey):
        node = node[key.key]
      elif isinstance(key, jax.tree_util.SequenceKey):
        node = node[key.idx]
      elif isinstance(key, jax.tree_util.GetAttrKey):
        node = getattr(node, key.name)
      else:
        node = jax.tree.flatten(node, is_leaf=lambda x, n=node: x is not n)[0][key.key]
    except (KeyError, IndexError, AttributeError, TypeError) as e:
      raise ValueError(
          "the classifier mask must be the params' structure or a prefix of it (as for "
          f"optax.masked); it has no entry for params{jax.tree_util.keystr(path[:depth + 1])}"
      ) from e
  if not jax.tree_util.treedef_is_leaf(jax.tree.structure(node)):
    raise ValueError("the classifier mask goes deeper than the params at "
                     f"params{jax.tree_util.keystr(path)}; give one bool per leaf or subtree")
  try:
    return bool(node)
  except jax.errors.ConcretizationTypeError as e:
    raise ValueError("the classifier mask must hold Python bools (it is static structure, as for "
                     f"optax.masked); got a traced value at params{jax.tree_util.keystr(path)}"
                     ) from e


def _classifier_leaves(classifier: ClassifierSelector, tree: Any):
  """Returns (leaves, treedef, indices of the selected leaves), validating their shapes."""
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
  leaves = [leaf for _, leaf in with_paths]
  if classifier is None:
    index = list(range(len(leaves)))
  else:
    mask = classifier(tree) if callable(classifier) else classifier
    index = [i for i, (path, _) in enumerate(with_paths) if _mask_value(mask, path)]
  if not any(jnp.ndim(leaves[i]) >= 2 for i in index):
    raise ValueError(
        "gradient_reweighting found no classifier weight leaf (a selected leaf with ndim >= 2, "
        "class axis last). Pass `classifier=` a mask or a function of the params that selects the "
        "classifier's kernel and bias, e.g. `{'backbone': False, 'classifier': True}`. Under "
        "optax.inject_hyperparams a classifier function is taken for a schedule unless named "
        "static: optax.inject_hyperparams(gradient_reweighting, static_args=('classifier',)).")
  sizes = {jnp.shape(leaves[i])[-1] for i in index}
  if len(sizes) != 1:
    raise ValueError(
        f"selected classifier leaves disagree on the number of classes (last axis sizes {sizes}); "
        "select only the classifier's kernel and bias.")
  return leaves, treedef, index


def _row_norms(weight_leaves) -> jax.Array:
  """‖G_c‖₂ over the weight rows only (all axes but the last), accumulated in float32."""
  sq = sum(
      jnp.sum(jnp.square(w.astype(jnp.float32)), axis=tuple(range(w.ndim - 1)))
      for w in weight_leaves)
  return jnp.sqrt(sq)


def _group_alpha(phi: jax.Array, group: jax.Array) -> jax.Array:
  """α_c = min_{j in group} Φ_j / Φ_c for c in the group, 0 outside it.

  Members with Φ = 0 (no gradient yet: in practice unseen classes left in the default group) are
  left out of the minimum, else it would be 0 and stop every class; they keep α = 1.
  """
  group_min = jnp.min(jnp.where(group & (phi > 0), phi, jnp.inf))
  alpha = jnp.where(phi > 0, group_min / jnp.where(phi > 0, phi, 1.0), 1.0)
  return jnp.where(group, alpha, 0.0)


def _group_mean(x: jax.Array, group: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(group, x, 0.0)) / jnp.maximum(jnp.sum(group), 1)


def _check_new_classes(new_classes, old_classes, num_classes: int) -> None:
  """Refuses concrete masks with no new class; traced ones (under jit) cannot be read."""
  masks = (new_classes, old_classes)
  if all(m is None for m in masks) or any(isinstance(m, jax.core.Tracer) for m in masks):
    return
  old = np.zeros(num_classes, bool) if old_classes is None else np.asarray(old_classes, bool)
  new = ~old if new_classes is None else np.asarray(new_classes, bool) & ~old
  if not new.any():
    raise ValueError(
        "the class masks select no new class (new_classes & ~old_classes is all False): DGR's "
        "q = mean_new Φ / mean_old Φ (docs/method.md §4) is then undefined and every classifier "
        "update would be zero. Every phase t ≥ 1 brings new classes: pass the phase's new-class "
        "mask (gr_jax.phase_constants(...).new_classes), not a batch's. To reweight classes "
        "without new ones, pass them as new_classes and no old_classes (intra-phase GR).")


def _kd_leaves(kd_updates: Any, updates: Any, treedef: Any) -> list[Any]:
  """kd_updates flattened like updates, with the usual misuse named instead of a structure dump."""
  try:
    return treedef.flatten_up_to(kd_updates)
  except (ValueError, TypeError) as e:
    is_masked_node = lambda x: isinstance(x, optax.MaskedNode)
    if any(map(is_masked_node, jax.tree.leaves(updates, is_leaf=is_masked_node))):
      raise ValueError(
          "kd_updates does not have the structure of updates, which hold optax.MaskedNode: this "
          "transform runs inside optax.masked, which masks extra arguments only when asked to. "
          "Build it as optax.masked(gradient_reweighting(), mask, mask_compatible_extra_args=True)."
      ) from e
    raise ValueError(
        "kd_updates must have the structure of updates (the same params tree and containers): "
        f"{e}") from e


def gradient_reweighting(
    classifier: ClassifierSelector = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Per-class gradient reweighting of a linear classifier: GR (phase 0) and DGR (phases ≥ 1).

  Let :math:`G_c` be the gradient of the cross-entropy loss w.r.t. the weight row of class
  :math:`c` (a column of a Flax ``Dense`` kernel) and :math:`g_c = \|G_c\|_2`. The state keeps the
  phase's cumulative norms :math:`\Phi_c \leftarrow \Phi_c + g_c` (seen classes, this step included).

  **Intra-phase GR** (no old classes; the default, usable with no extra arguments)::

    α_c = min_j Φ_j / Φ_c,     ∂W_c ← α_c ∂W_c,   ∂b_c ← α_c ∂b_c.

  **Decoupled GR** (``old_classes`` given): α is computed inside each group (old, new), and the
  groups are balanced against each other with the attenuation γ::

    q = mean_new Φ / mean_old Φ,   r_old = min(1, q),   r_new = min(1, γ q),
    s_c = α_c r_old (old c),  α_c r_new (new c),
    β = ‖(s_c g_c)_{c seen}‖₂ / ‖(h_c)_{c old}‖₂,   h_c = ‖∂L_KD/∂W_c‖₂,
    ∂W_c ← s_c G^CE_c + β G^KD_c (old c),   s_c G^CE_c (new c),   0 (unseen c).

  Biases get the same factors as their class rows. α ∈ (0, 1] and α = 1 for the least-updated class
  of each group; unseen classes (neither old nor new) get a zero update. A class whose Φ is still 0
  (it has had no gradient, e.g. a class masked out of the loss while no masks are passed here) is
  left out of its group's minimum and keeps α = 1, which leaves its zero gradient zero.

  Args:
    classifier: which leaves are the classifier, given as ``optax.masked`` takes its mask: ``None``
      (every leaf; use inside ``optax.masked``), a pytree of Python bools with the params'
      structure or a prefix of it (a bool stands for a whole subtree, e.g.
      ``{'params': {'backbone': False, 'head': True}}``), or a function of the params returning
      one. Masks are matched to the params by key, so a dict mask fits ``FrozenDict`` params. The
      mask is static structure, read at trace time. Selected leaves carry the class axis last;
      those with ``ndim >= 2`` are weights (their rows give ``g_c``), 1-d ones are biases (scaled
      only). All other leaves pass through untouched.

  The returned transform's ``update(updates, state, params=None, *, new_classes=None,
  old_classes=None, kd_updates=None, gamma=1.0)`` takes as extra arguments:

    * ``new_classes``, ``old_classes``: bool ``[C]`` masks. Without them every class is new (plain
      intra-phase GR); with ``old_classes`` the update is DGR. The new classes are
      ``new_classes & ~old_classes`` and must not be empty: §4 divides by the new group's mean Φ,
      and every phase t ≥ 1 has new classes. Concrete masks without one are a ValueError; traced
      masks (under jit) cannot be checked and then give a zero classifier update (q = 0, so
      s = β = 0) while Φ still accumulates.
    * ``kd_updates``: the KD gradient, a pytree shaped like ``updates`` (only its classifier leaves
      are read); it requires ``old_classes`` (a ValueError otherwise, as do masks not shaped
      ``[C]``). For classifier leaves ``updates`` must then hold the CE gradient alone; for every
      other leaf ``updates`` holds the gradient of the total loss, which passes through. Inside
      ``optax.masked`` pass ``mask_compatible_extra_args=True``, so that optax masks
      ``kd_updates`` as it masks ``updates`` (without it, a ValueError naming the flag).
    * ``gamma``: γ = exp(−N_seen / (N_seen + N_new)) of the phase.

  Gradients may be bf16: norms and factors are computed in float32 and the outputs keep the input
  dtype. With data parallelism, pass the gradient of the *global* batch (reduce before this).

  ``optax.inject_hyperparams`` takes every callable argument for a schedule, so a ``classifier``
  function must be named static: ``optax.inject_hyperparams(gradient_reweighting,
  static_args=("classifier",))(classifier=fn)``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is :class:`GradientReweightingState`.
  """
  def init_fn(params):
    leaves, _, index = _classifier_leaves(classifier, params)
    num_classes = jnp.shape(leaves[index[0]])[-1]
    return GradientReweightingState(
        cumulative_norms=jnp.zeros((num_classes,), jnp.float32),
        class_scale=jnp.ones((num_classes,), jnp.float32),
        kd_scale=jnp.zeros((), jnp.float32))

  def update_fn(updates, state, params=None, *, new_classes=None, old_classes=None,
                kd_updates=None, gamma=1.0, **extra_args):
    del params, extra_args
    leaves, treedef, index = _classifier_leaves(classifier, updates)
    num_classes = state.cumulative_norms.shape[0]
    chex.assert_shape([leaves[i] for i in index], (..., num_classes))
    for name, mask in (("new_classes", new_classes), ("old_classes", old_classes)):
      if mask is not None and jnp.shape(mask) != (num_classes,):
        raise ValueError(f"{name} has shape {jnp.shape(mask)}; expected ({num_classes},): one bool "
                         "per class, the phase's class mask (gr_jax.phase_constants), not a batch's")
    if kd_updates is not None and old_classes is None:
      raise ValueError("kd_updates needs old_classes: the KD gradient is added to the old classes' "
                       "rows only (DGR); pass the phase's old-class mask (gr_jax.phase_constants)")
    _check_new_classes(new_classes, old_classes, num_classes)

    no_old = jnp.zeros((num_classes,), bool)
    old = no_old if old_classes is None else jnp.asarray(old_classes, bool)
    new = (~old) if new_classes is None else jnp.asarray(new_classes, bool) & ~old
    seen = old | new

    g = _row_norms([leaves[i] for i in index if leaves[i].ndim >= 2])
    phi = state.cumulative_norms + jnp.where(seen, g, 0.0)
    alpha = _group_alpha(phi, old) + _group_alpha(phi, new)

    has_old = jnp.any(old)
    q = _group_mean(phi, new) / jnp.where(has_old, _group_mean(phi, old), 1.0)
    r_old = jnp.minimum(1.0, q)
    r_new = jnp.where(has_old, jnp.minimum(1.0, jnp.asarray(gamma, jnp.float32) * q), 1.0)
    scale = alpha * jnp.where(old, r_old, r_new)

    if kd_updates is None:
      beta = jnp.zeros((), jnp.float32)
      kd_leaves = None
    else:
      kd_leaves = _kd_leaves(kd_updates, updates, treedef)
      h = _row_norms([kd_leaves[i] for i in index if kd_leaves[i].ndim >= 2])
      kd_norm = jnp.sqrt(jnp.sum(jnp.where(old, h * h, 0.0)))
      ce_norm = jnp.sqrt(jnp.sum(jnp.square(scale * g)))
      beta = jnp.where(kd_norm > 0, ce_norm / jnp.where(kd_norm > 0, kd_norm, 1.0), 0.0)

    out = list(leaves)
    for i in index:
      new_leaf = leaves[i].astype(jnp.float32) * scale
      if kd_leaves is not None:
        new_leaf = new_leaf + jnp.where(old, beta, 0.0) * kd_leaves[i].astype(jnp.float32)
      out[i] = new_leaf.astype(leaves[i].dtype)
    new_state = GradientReweightingState(cumulative_norms=phi, class_scale=scale, kd_scale=beta)
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
