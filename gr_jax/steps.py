"""Pure train / eval steps: epochs are ``lax.scan``s over device-resident data.

Gradients (docs/method.md §3–§4): the backbone runs forward once and its VJP is kept; the classifier
head is differentiated twice, once for L_CE and once for L_KD, so the CE and KD gradients of the
classifier stay apart for DGR while the backbone gets the gradient of the total loss through a single
backward pass. Shapes never depend on the phase: the classifier covers all classes, phase data are
padded to one capacity and an epoch runs a fixed number of steps whose tail is skipped by
``lax.cond``, so a run compiles one base-phase and one incremental epoch function. (A loop whose trip
count is the phase's batch count was measured slower on an H100: a dynamic trip count makes the host
wait for the device every iteration, BENCHMARKS.md.)
"""

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gr_jax import losses
from gr_jax import metrics
from gr_jax import parallel
from gr_jax.phase_constants import PhaseConstants
from gr_jax.reweight import GradientReweightingState
from gr_jax.state import set_learning_rate


@dataclasses.dataclass(frozen=True)
class Method:
  """Which parts of GR/DGR are on (the paper's method and its ablations / baseline).

  Attributes:
    reweighting: 'dgr' (GR in phase 0, decoupled GR after), 'gr' (intra-phase GR over all seen
      classes in every phase, no decoupling; KD gradient summed before reweighting) or 'none'.
    kd: 'dakd', 'plain' or 'none'.
    logit_prior: add log π(t) to the logits in the training CE.
    temperature: KD temperature T.
  """
  reweighting: str = "dgr"
  kd: str = "dakd"
  logit_prior: bool = True
  temperature: float = 2.0

  def __post_init__(self):
    if self.reweighting not in ("dgr", "gr", "none"):
      raise ValueError(f"unknown method.reweighting {self.reweighting!r}: use dgr, gr or none")
    if self.kd not in ("dakd", "plain", "none"):
      raise ValueError(f"unknown method.kd {self.kd!r}: use dakd, plain or none")


class PhaseData(NamedTuple):
  """A phase's training set on device: new-class images plus exemplars, padded to a capacity.

  ``size`` is shared by all seeds (they hold the same number of exemplars), which keeps the
  ``lax.cond`` that skips padding steps a real branch under a seed ``vmap``.
  """
  images: jax.Array  # uint8 [S, N, H, W, 3]
  labels: jax.Array  # int32 [S, N] class positions
  size: jax.Array    # int32 scalar: rows of real data (the rest is padding)


def _apply_features(model, params, batch_stats, x, train, mask=None):
  variables = {"params": params, "batch_stats": batch_stats}
  if train:
    feats, new = model.apply(variables, x, train=True, mask=mask, method="features",
                             mutable=["batch_stats"])
    return feats, new["batch_stats"]
  return model.apply(variables, x, train=False, method="features"), batch_stats


def _head(model, params, head_params, feats):
  return model.apply({"params": dict(params, classifier=head_params)}, feats, method="head")


def _gradients(model, method: Method, incremental: bool, params, batch_stats, teacher, x, y, mask,
               consts: PhaseConstants):
  """Returns (grads, kd_grads or None, new batch_stats, metrics) for one batch."""
  feats, backbone_vjp, new_stats = jax.vjp(
      lambda bb: _apply_features(model, dict(params, backbone=bb), batch_stats, x, True, mask),
      params["backbone"], has_aux=True)
  seen = consts.old_classes | consts.new_classes
  prior_counts = consts.class_counts if method.logit_prior else seen.astype(jnp.float32)

  def ce_fn(head, f):
    logits = _head(model, params, head, f)
    return losses.prior_adjusted_cross_entropy(logits, y, prior_counts, mask)

  ce, (g_head_ce, g_feat) = jax.value_and_grad(ce_fn, argnums=(0, 1))(params["classifier"], feats)
  g_head_kd, kd = None, jnp.zeros((), jnp.float32)
  if incremental and method.kd != "none":
    teacher_params, teacher_stats = teacher
    teacher_logits = model.apply({"params": teacher_params, "batch_stats": teacher_stats}, x,
                                 train=False)[1]
    kd_loss = (losses.distribution_aware_kd if method.kd == "dakd" else
               lambda z, t, old, _, temp, w: losses.knowledge_distillation(z, t, old, temp, w))

    def kd_fn(head, f):
      logits = _head(model, params, head, f)
      return consts.kd_weight * kd_loss(logits, teacher_logits, consts.old_classes,
                                        consts.lost_counts, method.temperature, mask)

    kd, (g_head_kd, g_feat_kd) = jax.value_and_grad(kd_fn, argnums=(0, 1))(
        params["classifier"], feats)
    g_feat = g_feat + g_feat_kd
  (g_backbone,) = backbone_vjp(g_feat.astype(feats.dtype))
  grads = {"backbone": g_backbone, "classifier": g_head_ce}
  kd_grads = None
  if g_head_kd is not None:
    if method.reweighting == "dgr":
      kd_grads = {"backbone": jax.tree.map(jnp.zeros_like, g_backbone), "classifier": g_head_kd}
    else:
      grads["classifier"] = jax.tree.map(jnp.add, g_head_ce, g_head_kd)
  return grads, kd_grads, new_stats, {"loss_ce": ce, "loss_kd": kd}


def _reweighting_args(method: Method, incremental: bool, consts: PhaseConstants, kd_grads):
  if method.reweighting == "none":
    return {}
  seen = consts.old_classes | consts.new_classes
  if method.reweighting == "gr" or not incremental:
    return {"new_classes": seen}
  return {"new_classes": consts.new_classes, "old_classes": consts.old_classes,
          "kd_updates": kd_grads, "gamma": consts.gamma}


def _epoch_start(carry, key, learning_rate, size, capacity: int):
  """Sets the epoch's lr, draws its example order (real rows first) and augmentation key."""
  params, batch_stats, opt_state, step = carry
  opt_state = set_learning_rate(opt_state, learning_rate)
  order_key, aug_key = jax.random.split(key)
  position = jnp.arange(capacity)
  order = jnp.argsort(jnp.where(position < size, jax.random.uniform(order_key, (capacity,)), 2.0))
  sums = {"loss_ce": jnp.zeros(()), "loss_kd": jnp.zeros(()), "examples": jnp.zeros(())}
  return (params, batch_stats, opt_state, step, sums), order, aug_key


def train_step(carry, i, order, aug_key, teacher, data: PhaseData, consts: PhaseConstants, *,
               model: nn.Module, tx: optax.GradientTransformationExtraArgs, method: Method,
               augment: Callable, batch_size: int, incremental: bool, mesh=None):
  """Step ``i`` of an epoch: batch ``order[i*B:(i+1)*B]`` (rows past ``size`` masked out)."""
  params, batch_stats, opt_state, step, sums = carry
  idx = jax.lax.dynamic_slice(order, (i * batch_size,), (batch_size,))
  mask = i * batch_size + jnp.arange(batch_size) < data.size
  images, labels = data.images[idx], data.labels[idx]
  if mesh is not None:
    images = parallel.shard_batch_axis(images, mesh)
    mask = parallel.shard_batch_axis(mask, mesh)
  x = augment(jax.random.fold_in(aug_key, i), images)
  grads, kd_grads, batch_stats, m = _gradients(
      model, method, incremental, params, batch_stats, teacher, x, labels, mask, consts)
  updates, opt_state = tx.update(grads, opt_state, params,
                                 **_reweighting_args(method, incremental, consts, kd_grads))
  params = optax.apply_updates(params, updates)
  n = jnp.sum(mask).astype(jnp.float32)
  sums = {"loss_ce": sums["loss_ce"] + n * m["loss_ce"],
          "loss_kd": sums["loss_kd"] + n * m["loss_kd"], "examples": sums["examples"] + n}
  return params, batch_stats, opt_state, step + 1, sums


def _epoch_end(carry, consts: PhaseConstants):
  """Example-weighted mean losses; β and the smallest class scale of the last step."""
  params, batch_stats, opt_state, step, sums = carry
  examples = jnp.maximum(sums["examples"], 1.0)
  out = {"loss_ce": sums["loss_ce"] / examples, "loss_kd": sums["loss_kd"] / examples,
         "examples": sums["examples"]}
  out["loss"] = out["loss_ce"] + out["loss_kd"]
  gr_state = _find_gr_state(opt_state)
  if gr_state is not None:
    out["gr_beta"] = gr_state.kd_scale
    seen = consts.old_classes | consts.new_classes
    out["gr_scale_min"] = jnp.min(jnp.where(seen, gr_state.class_scale, jnp.inf))
  return (params, batch_stats, opt_state, step), out


def train_epoch(carry, teacher, data: PhaseData, consts: PhaseConstants, key, learning_rate, *,
                num_steps: int, **step_kwargs):
  """One epoch as a single ``lax.scan``; the last batch is partial (masked), never dropped.

  Args:
    carry: ``(params, batch_stats, opt_state, step)``.
    teacher: ``(teacher_params, teacher_batch_stats)`` (unused in the base phase).
    data: the phase's padded training set.
    consts: the phase's :class:`PhaseConstants`.
    key: the epoch's PRNG key (order and augmentation).
    learning_rate: this epoch's SGD learning rate.
    num_steps: static step count of the padded capacity; steps past ``ceil(size / batch)`` are
      skipped by ``lax.cond``.
    **step_kwargs: the static arguments of :func:`train_step`.

  Returns:
    The new carry and the epoch's metrics.
  """
  batch_size = step_kwargs["batch_size"]
  carry, order, aug_key = _epoch_start(carry, key, learning_rate, data.size,
                                       data.labels.shape[0])

  def body(c, i):
    run = lambda c: train_step(c, i, order, aug_key, teacher, data, consts, **step_kwargs)
    return jax.lax.cond(i * batch_size < data.size, run, lambda c: c, c), None

  carry, _ = jax.lax.scan(body, carry, jnp.arange(num_steps))
  return _epoch_end(carry, consts)


def train_epochs(carry, teacher, data: PhaseData, consts: PhaseConstants, keys, learning_rates,
                 **epoch_kwargs):
  """Several epochs in one compiled call (``lax.scan`` over :func:`train_epoch`).

  ``keys`` and ``learning_rates`` hold one entry per epoch; the metrics come back stacked the same
  way. Running the epochs between two checkpoints in one call keeps the host out of the loop.
  """
  def one_epoch(c, key_and_lr):
    key, lr = key_and_lr
    return train_epoch(c, teacher, data, consts, key, lr, **epoch_kwargs)

  return jax.lax.scan(one_epoch, carry, (keys, learning_rates))


def _find_gr_state(opt_state):
  for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, GradientReweightingState)):
    if isinstance(s, GradientReweightingState):
      return s
  return None


def evaluate(params, batch_stats, images, labels, valid, seen, task_of_class, *, model, augment,
             mesh=None):
  """Per-class correct counts (TAg, TAw) of one chunk of the test set."""
  if mesh is not None:
    images = parallel.shard_batch_axis(images, mesh)
  logits = model.apply({"params": params, "batch_stats": batch_stats}, augment(images),
                       train=False)[1]
  tag, taw, _ = metrics.per_class_correct(logits, labels, valid, seen, task_of_class)
  return tag, taw


def extract_features(params, batch_stats, images, *, model, augment, mesh=None):
  """Backbone features under the test transform, model in inference mode (for herding)."""
  if mesh is not None:
    images = parallel.shard_batch_axis(images, mesh)
  return _apply_features(model, params, batch_stats, augment(images), False)[0].astype(
      jnp.float32)


SEED_EXECUTIONS = ("vmap", "sequential")


def over_seeds(fn: Callable[..., Any], in_axes: tuple[Any, ...], execution: str,
               unroll: bool = False) -> Callable[..., Any]:
  """Maps ``fn`` over the leading seed axis of the arguments whose ``in_axes`` entry is 0.

  ``in_axes`` is a tuple with one entry per positional argument, each 0, None or a pytree prefix
  of them (as for ``jax.vmap``); outputs get the seed axis first. How the seeds run:

  * one seed: the axis is squeezed away, so the program is the plain single-run one;
  * ``'vmap'``: all seeds batched into each op. Convolutions with per-seed weights become grouped
    convolutions, which cuDNN runs slower per seed than dense ones (BENCHMARKS.md);
  * ``'sequential'``: a ``lax.map`` over the seeds inside the one compiled program: every seed runs
    the dense single-seed kernels, one seed after the other. With ``unroll`` the seeds are traced
    one after the other instead, with no loop: XLA:CPU runs convolutions inside loops an order of
    magnitude slower (the host-loop epoch path sets it), while on a GPU the loop keeps compilation
    time independent of the number of seeds.
  """
  if execution not in SEED_EXECUTIONS:
    raise ValueError(f"unknown seed execution {execution!r}: use one of {SEED_EXECUTIONS}")
  vmapped = jax.vmap(fn, in_axes=in_axes)
  is_axis = lambda x: x is None or isinstance(x, int)

  def split(args, batched: bool):
    pick = lambda axis, sub: sub if (axis == 0) == batched else None
    return jax.tree.map(pick, tuple(in_axes), tuple(args), is_leaf=is_axis)

  def merge(batched_args, other_args):
    pick = lambda axis, b, o: b if axis == 0 else o
    return jax.tree.map(pick, tuple(in_axes), batched_args, other_args, is_leaf=is_axis)

  def mapped(*args):
    batched, other = split(args, True), split(args, False)
    num_seeds = jax.tree.leaves(batched)[0].shape[0]
    if num_seeds == 1:
      out = fn(*merge(jax.tree.map(lambda x: x[0], batched), other))
      return jax.tree.map(lambda x: x[None], out)
    if execution == "vmap":
      return vmapped(*args)
    if unroll:
      outs = [fn(*merge(jax.tree.map(lambda x, i=i: x[i], batched), other))
              for i in range(num_seeds)]
      return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return jax.lax.map(lambda b: fn(*merge(b, other)), batched)

  # Compiled programs (profiles, HLO dumps) keep the wrapped function's name.
  mapped.__name__ = getattr(fn, "__name__", None) or getattr(fn, "func").__name__
  return mapped


class StepFns(NamedTuple):
  """The compiled functions of one step kind (base or incremental phase), mapped over seeds.

  ``train_epochs(carry, teacher, data, consts, keys [S, E], lrs [E]) -> (carry, metrics [S, E])``
  runs E epochs: as one ``lax.scan`` (``epoch_as_scan``, the fast path on GPU/TPU) or as a host
  loop over a jitted step (XLA:CPU runs convolutions inside loops an order of magnitude slower).
  ``evaluate`` and ``features`` take chunks of images; ``compiled`` lists the jitted functions
  (for trace checks).
  """
  train_epochs: Callable[..., Any]
  evaluate: Callable[..., Any]
  features: Callable[..., Any]
  compiled: tuple[Any, ...]


def make_step_fns(model, tx, method: Method, train_augment, test_augment, *, batch_size: int,
                  num_steps: int, incremental: bool, epoch_as_scan: bool, mesh=None,
                  seed_execution: str = "sequential") -> StepFns:
  """Builds the jitted step functions (state/data arguments lead with a seed axis).

  ``seed_execution`` says how several seeds share the program (:func:`over_seeds`).
  """
  step_kwargs = dict(model=model, tx=tx, method=method, augment=train_augment,
                     batch_size=batch_size, incremental=incremental, mesh=mesh)
  data_axes = PhaseData(0, 0, None)
  seeds = functools.partial(over_seeds, execution=seed_execution, unroll=not epoch_as_scan)
  evaluate_fn = jax.jit(seeds(
      functools.partial(evaluate, model=model, augment=test_augment, mesh=mesh),
      (0, 0, None, None, None, None, None)))
  features_fn = jax.jit(seeds(
      functools.partial(extract_features, model=model, augment=test_augment, mesh=mesh),
      (0, 0, 0)))
  if epoch_as_scan:
    epochs = jax.jit(seeds(functools.partial(train_epochs, num_steps=num_steps, **step_kwargs),
                           (0, 0, data_axes, None, 0, None)), donate_argnums=(0,))
    return StepFns(epochs, evaluate_fn, features_fn, (epochs, evaluate_fn, features_fn))

  start = jax.jit(seeds(functools.partial(_epoch_start, capacity=num_steps * batch_size),
                        (0, 0, None, None)), donate_argnums=(0,))
  step = jax.jit(seeds(functools.partial(train_step, **step_kwargs),
                       (0, None, 0, 0, 0, data_axes, None)), donate_argnums=(0,))
  end = jax.jit(seeds(_epoch_end, (0, None)), donate_argnums=(0,))

  def looped_epochs(carry, teacher, data, consts, keys, learning_rates):
    per_epoch = []
    for e in range(keys.shape[1]):
      carry, order, aug_key = start(carry, keys[:, e], learning_rates[e], data.size)
      for i in range(-(-int(data.size) // batch_size)):
        carry = step(carry, jnp.int32(i), order, aug_key, teacher, data, consts)
      carry, m = end(carry, consts)
      per_epoch.append(m)
    return carry, jax.tree.map(lambda *m: jnp.stack(m, axis=1), *per_epoch)

  return StepFns(looped_epochs, evaluate_fn, features_fn, (step, evaluate_fn, features_fn))
