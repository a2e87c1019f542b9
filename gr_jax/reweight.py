"""Per-class gradient reweighting of a linear classifier (GR and decoupled DGR) as an optax transform.

He & Zhu, "Gradient Reweighting: Towards Imbalanced Class-Incremental Learning", CVPR 2024
(arXiv 2402.18528), §3.2–3.3; the exact rules gr_jax follows are in ``docs/method.md`` §4.

The transform rescales, class by class, the gradient rows of a classifier (the columns of a Flax
``Dense`` kernel ``[D, C]`` -- the class axis is the last axis -- and the entries of its bias) so that
classes that have accumulated large gradients slow down and rarely-updated classes keep their pace.
Every leaf that is not a classifier leaf passes through bit-identical, so the transform can sit at
the head of any ``optax.chain``. This module imports nothing from gr_jax and can be copied alone.
"""

import functools
from typing import Any, Callable, NamedTuple, Sequence, Union

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
    cumulative_kd_norms: float32 ``[C]``: the sum over this phase's steps of each old class's KD
      gradient-row norm ``h_c``; 0 for other classes and without ``kd_updates``. For diagnostics.
  """
  cumulative_norms: jax.Array
  class_scale: jax.Array
  kd_scale: jax.Array
  cumulative_kd_norms: jax.Array


class ReweightingFactors(NamedTuple):
  """The per-class factors of one GR/DGR step (docs/method.md §4, steps 3–4).

  Attributes:
    alpha: α, float32 ``[C]``, computed inside each group (0 for unseen classes).
    r_old: the old classes' group factor (a float32 scalar; 1 without old classes).
    r_new: the new classes' group factor (a float32 scalar; 1 without old classes).
    class_scale: ``s_c``, float32 ``[C]``: α·r_old (old), α·r_new (new), 0 (unseen).
  """
  alpha: jax.Array
  r_old: jax.Array
  r_new: jax.Array
  class_scale: jax.Array


_INJECT_HINT = (
    "optax.inject_hyperparams takes a classifier function for a schedule and calls it with the "
    "step count unless it is named static: optax.inject_hyperparams(gradient_reweighting, "
    "static_args=('classifier',)).")


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
        "classifier's kernel and bias, e.g. `{'backbone': False, 'classifier': True}`. "
        + _INJECT_HINT)
  sizes = {jnp.shape(leaves[i])[-1] for i in index}
  if len(sizes) != 1:
    raise ValueError(
        f"selected classifier leaves disagree on the number of classes (last axis sizes {sizes}); "
        "select only the classifier's kernel and bias.")
  return leaves, treedef, index


def _l2_norm(parts: Sequence[jax.Array]) -> jax.Array:
  """‖·‖₂ along axis 0 of the parts taken together, in float32, without under- or overflow.

  float32 squares underflow below ~1e-19 and overflow above ~1e19, so every column is divided by
  its largest |value| before squaring: one pass over the parts for the maxima, one for the sums of
  squares (parts are not concatenated). Only a norm beyond float32's range (~3.4e38) is inf.
  """
  parts = [p.astype(jnp.float32) for p in parts]
  peak = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(p), axis=0) for p in parts])
  divisor = jnp.where(peak > 0, peak, 1.0)
  return peak * jnp.sqrt(sum(jnp.sum(jnp.square(p / divisor), axis=0) for p in parts))


def _row_norms(weight_leaves) -> jax.Array:
  """‖G_c‖₂ over the weight rows only (all axes but the last, across leaves), in float32."""
  return _l2_norm([w.reshape(-1, w.shape[-1]) for w in weight_leaves])


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


def _capped_ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """min(1, numerator / denominator) for numerator ≥ 0, and 1 where the denominator is 0.

  Never NaN or inf: the quotient is only formed where it is below 1, so its denominator is > 0.
  """
  capped = numerator >= denominator
  return jnp.where(capped, 1.0, numerator / jnp.where(capped, 1.0, denominator))


def _class_groups(old_classes, new_classes, num_classes: int) -> tuple[jax.Array, jax.Array]:
  """(old, new) bool [C] masks: no old classes by default, new = new_classes & ~old (all ~old)."""
  old = jnp.zeros((num_classes,), bool) if old_classes is None else jnp.asarray(old_classes, bool)
  new = (~old) if new_classes is None else jnp.asarray(new_classes, bool) & ~old
  return old, new


def reweighting_factors(cumulative_norms: jax.Array, old_classes: Any = None,
                        new_classes: Any = None, gamma: Any = 1.0) -> ReweightingFactors:
  r"""α, r_old, r_new and s of GR/DGR (docs/method.md §4) from the cumulative norms Φ.

  :func:`gradient_reweighting` computes its factors with this function from Φ after the step's
  update, which its state keeps: ``reweighting_factors(state.cumulative_norms, old, new, gamma)``
  gives again, bit for bit, the factors of the step that produced ``state``. The masks and γ are
  read as ``update`` reads them (``None``: no old classes / every class not old is new).

  Where §4 is silent (the conventions beside it in docs/method.md): a class with Φ_c = 0 keeps
  α = 1 and is left out of its group's minimum; when mean_old Φ = 0 (no old class, or none with a
  weight gradient yet) q is 0/0 or x/0 and r_old = r_new = 1. Always finite for finite Φ ≥ 0.

  Args:
    cumulative_norms: Φ, float ``[C]``.
    old_classes: bool ``[C]`` or ``None``.
    new_classes: bool ``[C]`` or ``None``.
    gamma: γ of the phase.

  Returns:
    :class:`ReweightingFactors`, float32.
  """
  phi = jnp.asarray(cumulative_norms, jnp.float32)
  old, new = _class_groups(old_classes, new_classes, phi.shape[0])
  alpha = _group_alpha(phi, old) + _group_alpha(phi, new)
  mean_old, mean_new = _group_mean(phi, old), _group_mean(phi, new)
  r_old = _capped_ratio(mean_new, mean_old)
  r_new = _capped_ratio(jnp.asarray(gamma, jnp.float32) * mean_new, mean_old)
  return ReweightingFactors(alpha=alpha, r_old=r_old, r_new=r_new,
                            class_scale=alpha * jnp.where(old, r_old, r_new))


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
    r_old = r_new = 1 where mean_old Φ = 0 (q = 0/0 or x/0; no old classes is this case),
    s_c = α_c r_old (old c),  α_c r_new (new c),
    β = ‖(s_c g_c)_{c seen}‖₂ / ‖(h_c)_{c old}‖₂ (0 where all h_c = 0),   h_c = ‖∂L_KD/∂W_c‖₂,
    ∂W_c ← s_c G^CE_c + β G^KD_c (old c),   s_c G^CE_c (new c),   0 (unseen c).

  Biases get the same factors as their class rows. α ∈ (0, 1] and α = 1 for the least-updated class
  of each group; unseen classes (neither old nor new) get a zero update. A class whose Φ is still 0
  (it has had no gradient, e.g. a class masked out of the loss while no masks are passed here) is
  left out of its group's minimum and keeps α = 1, which leaves its zero gradient zero. r = 1 where
  mean_old Φ = 0 is the limit of min(1, q) and min(1, γq) as q → ∞; it gives s = α, as in phase 0.
  These conventions, where §4 is silent, are set out beside it in docs/method.md;
  :func:`reweighting_factors` computes α, r and s for this transform.

  Norms do not under- or overflow on the way (each row is divided by its largest |value| before
  squaring), so gradient entries anywhere in float32's normal range (~1e-38 to ~3e38) give α and β
  to float32 precision; only a row norm, or a phase's sum Φ of them, beyond float32's largest value
  (~3.4e38) is inf.

  Args:
    classifier: which leaves are the classifier, given as ``optax.masked`` takes its mask: ``None``
      (every leaf; use inside ``optax.masked``), a pytree of Python bools with the params'
      structure or a prefix of it (a bool stands for a whole subtree, e.g.
      ``{'params': {'backbone': False, 'head': True}}``), or a function of the params returning
      one. Masks are matched to the params by key, so a dict mask fits ``FrozenDict`` params. The
      mask is static structure, read at trace time; a single bool or array is refused (it is what
      ``optax.inject_hyperparams`` makes of a function not named static, below). Selected leaves
      carry the class axis last; those with ``ndim >= 2`` are weights (their rows give ``g_c``),
      1-d ones are biases (scaled only). All other leaves pass through untouched.

  The returned transform's ``update(updates, state, params=None, *, new_classes=None,
  old_classes=None, kd_updates=None, gamma=1.0)`` takes as extra arguments:

    * ``new_classes``, ``old_classes``: bool ``[C]`` masks. Without them every class is new (plain
      intra-phase GR); with ``old_classes`` the update is DGR. The new classes are
      ``new_classes & ~old_classes`` and must not be empty: §4 divides by the new group's mean Φ,
      and every phase t ≥ 1 has new classes. Concrete masks without one are a ValueError; traced
      masks (under jit) cannot be checked and then give a zero classifier update once the old
      classes have had a gradient (q = 0, so s = β = 0) while Φ still accumulates.
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
  if (classifier is not None and not callable(classifier)
      and jax.tree_util.treedef_is_leaf(jax.tree.structure(classifier))):
    raise ValueError(
        f"gradient_reweighting got classifier={classifier!r}, a single value, not a mask of the "
        "params; pass classifier=None to select every leaf. " + _INJECT_HINT)

  def init_fn(params):
    leaves, _, index = _classifier_leaves(classifier, params)
    num_classes = jnp.shape(leaves[index[0]])[-1]
    return GradientReweightingState(
        cumulative_norms=jnp.zeros((num_classes,), jnp.float32),
        class_scale=jnp.ones((num_classes,), jnp.float32),
        kd_scale=jnp.zeros((), jnp.float32),
        cumulative_kd_norms=jnp.zeros((num_classes,), jnp.float32))

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

    old, new = _class_groups(old_classes, new_classes, num_classes)
    g = _row_norms([leaves[i] for i in index if leaves[i].ndim >= 2])
    phi = state.cumulative_norms + jnp.where(old | new, g, 0.0)
    scale = reweighting_factors(phi, old_classes, new_classes, gamma).class_scale

    if kd_updates is None:
      beta = jnp.zeros((), jnp.float32)
      kd_leaves = None
      kd_phi = state.cumulative_kd_norms
    else:
      kd_leaves = _kd_leaves(kd_updates, updates, treedef)
      h = jnp.where(old, _row_norms([kd_leaves[i] for i in index if kd_leaves[i].ndim >= 2]), 0.0)
      kd_phi = state.cumulative_kd_norms + h
      kd_norm = _l2_norm([h])
      ce_norm = _l2_norm([scale * g])
      beta = jnp.where(kd_norm > 0, ce_norm / jnp.where(kd_norm > 0, kd_norm, 1.0), 0.0)

    out = list(leaves)
    for i in index:
      new_leaf = leaves[i].astype(jnp.float32) * scale
      if kd_leaves is not None:
        new_leaf = new_leaf + jnp.where(old, beta, 0.0) * kd_leaves[i].astype(jnp.float32)
      out[i] = new_leaf.astype(leaves[i].dtype)
    new_state = GradientReweightingState(cumulative_norms=phi, class_scale=scale, kd_scale=beta,
                                         cumulative_kd_norms=kd_phi)
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
