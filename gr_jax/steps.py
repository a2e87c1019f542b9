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
from gr_jax import optim
from gr_jax import parallel
from gr_jax.phase_constants import PhaseConstants
from gr_jax.state import TrainState


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

  @classmethod
  def from_config(cls, config) -> "Method":
    m = config.method
    return cls(reweighting=m.reweighting, kd=m.kd, logit_prior=m.logit_prior,
               temperature=m.temperature)


class PhaseData(NamedTuple):
  """A phase's training set on device: new-class images plus exemplars, padded to a capacity."""
  images: jax.Array  # uint8 [N, H, W, 3]
  labels: jax.Array  # int32 [N] class positions
  size: jax.Array    # int32 scalar: rows of real data (the rest is padding)


class Batch(NamedTuple):
  """One training batch; rows whose ``mask`` is False are padding and take no part in the step."""
  images: jax.Array  # uint8 [B, H, W, 3]
  labels: jax.Array  # int32 [B]
  mask: jax.Array    # bool [B]


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
  # The classifier's CE gradient-row norms (float32 [C]): what the reweighting accumulates as Φ;
  # recorded for every method, so that a run without reweighting shows its update imbalance too.
  class_grad_norm = jnp.sqrt(jnp.sum(jnp.square(g_head_ce["kernel"].astype(jnp.float32)), axis=0))
  return grads, kd_grads, new_stats, {"loss_ce": ce, "loss_kd": kd,
                                      "class_grad_norm": class_grad_norm}



def _reweighting_args(method: Method, incremental: bool, consts: PhaseConstants, kd_grads):
  if method.reweighting == "none":
    return {}
  seen = consts.old_classes | consts.new_classes
  if method.reweighting == "gr" or not incremental:
    return {"new_classes": seen}
  return {"new_classes": consts.new_classes, "old_classes": consts.old_classes,
          "kd_updates": kd_grads, "gamma": consts.gamma}


def train_step(state: TrainState, batch: Batch, key: jax.Array, teacher, consts: PhaseConstants,
               *, model: nn.Module, tx: optax.GradientTransformationExtraArgs, method: Method,
               augment: Callable, incremental: bool) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on ``batch`` (augmented with ``key``): losses → CE/KD head gradients kept
  apart, one backbone backward pass → the optimiser (GR/DGR, weight decay, SGD).

  ``teacher`` is ``(params, batch_stats)`` of the previous phase's model (unused in phase 0).
  Returns the new state and the batch's metrics: mean losses, real-row count (``examples``), the
  classifier's CE gradient-row norms (``class_grad_norm`` [C]) and, with reweighting, the step's β
  (``gr_beta``).
  """
  x = augment(key, batch.images)
  grads, kd_grads, batch_stats, m = _gradients(
      model, method, incremental, state.params, state.batch_stats, teacher, x, batch.labels,
      batch.mask, consts)
  updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                 **_reweighting_args(method, incremental, consts, kd_grads))
  state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        batch_stats=batch_stats, opt_state=opt_state)
  m["examples"] = jnp.sum(batch.mask).astype(jnp.float32)
  gr_state = optim.reweighting_state(opt_state)
  if gr_state is not None:
    m["gr_beta"] = gr_state.kd_scale
  return state, m


def _with_learning_rate(opt_state, learning_rate):
  """The optimiser state with its injected learning rate set (``optax.inject_hyperparams``)."""
  rate = opt_state.hyperparams["learning_rate"]
  return opt_state._replace(hyperparams=dict(
      opt_state.hyperparams, learning_rate=jnp.asarray(learning_rate, rate.dtype)))


def _epoch_start(state: TrainState, key, learning_rate, size, capacity: int):
  """Sets the epoch's lr, draws its example order (real rows first) and augmentation key."""
  state = state.replace(opt_state=_with_learning_rate(state.opt_state, learning_rate))
  order_key, aug_key = jax.random.split(key)
  position = jnp.arange(capacity)
  order = jnp.argsort(jnp.where(position < size, jax.random.uniform(order_key, (capacity,)), 2.0))
  num_classes = state.params["classifier"]["bias"].shape[-1]
  sums = {"loss_ce": jnp.zeros(()), "loss_kd": jnp.zeros(()), "examples": jnp.zeros(()),
          "steps": jnp.zeros(()), "class_grad_norms": jnp.zeros((num_classes,))}
  if optim.reweighting_state(state.opt_state) is not None:
    sums.update(gr_beta_sum=jnp.zeros(()), gr_beta_min=jnp.full((), jnp.inf, jnp.float32),
                gr_beta_max=jnp.full((), -jnp.inf, jnp.float32))
  return (state, sums), order, aug_key


def _epoch_step(carry, i, order, aug_key, teacher, data: PhaseData, consts: PhaseConstants, *,
                batch_size: int, mesh=None, **step_kwargs):
  """Step ``i`` of an epoch: rows ``order[i*B:(i+1)*B]`` (those past ``size`` masked out); adds
  the batch's example-weighted losses to the epoch's sums."""
  state, sums = carry
  idx = jax.lax.dynamic_slice(order, (i * batch_size,), (batch_size,))
  batch = Batch(data.images[idx], data.labels[idx],
                i * batch_size + jnp.arange(batch_size) < data.size)
  if mesh is not None:
    batch = batch._replace(images=parallel.shard_batch_axis(batch.images, mesh),
                           mask=parallel.shard_batch_axis(batch.mask, mesh))
  state, m = train_step(state, batch, jax.random.fold_in(aug_key, i), teacher, consts,
                        **step_kwargs)
  n = m["examples"]
  out = {"loss_ce": sums["loss_ce"] + n * m["loss_ce"],
         "loss_kd": sums["loss_kd"] + n * m["loss_kd"], "examples": sums["examples"] + n,
         "steps": sums["steps"] + 1,
         "class_grad_norms": sums["class_grad_norms"] + m["class_grad_norm"]}
  if "gr_beta" in m:
    out.update(gr_beta_sum=sums["gr_beta_sum"] + m["gr_beta"],
               gr_beta_min=jnp.minimum(sums["gr_beta_min"], m["gr_beta"]),
               gr_beta_max=jnp.maximum(sums["gr_beta_max"], m["gr_beta"]))
  return state, out


def _epoch_end(carry, consts: PhaseConstants):
  """The epoch's metrics: example-weighted mean losses, the step count, the sums of the classifier's
  CE gradient-row norms over its steps; with reweighting β (the last step's, and its mean, min and
  max over the steps) and the last step's smallest class scale."""
  state, sums = carry
  examples = jnp.maximum(sums["examples"], 1.0)
  out = {"loss_ce": sums["loss_ce"] / examples, "loss_kd": sums["loss_kd"] / examples,
         "examples": sums["examples"], "steps": sums["steps"],
         "class_grad_norms": sums["class_grad_norms"]}
  out["loss"] = out["loss_ce"] + out["loss_kd"]
  gr_state = optim.reweighting_state(state.opt_state)
  if gr_state is not None:
    out["gr_beta"] = gr_state.kd_scale
    out["gr_beta_mean"] = sums["gr_beta_sum"] / jnp.maximum(sums["steps"], 1.0)
    out["gr_beta_min"], out["gr_beta_max"] = sums["gr_beta_min"], sums["gr_beta_max"]
    seen = consts.old_classes | consts.new_classes
    out["gr_scale_min"] = jnp.min(jnp.where(seen, gr_state.class_scale, jnp.inf))
  return state, out


def train_epoch(state: TrainState, teacher, data: PhaseData, consts: PhaseConstants, key,
                learning_rate, *, num_steps: int, batch_size: int, **step_kwargs):
  """One epoch as a single ``lax.scan``; the last batch is partial (masked), never dropped.

  Args:
    state: the :class:`TrainState`.
    teacher: ``(teacher_params, teacher_batch_stats)`` (unused in the base phase).
    data: the phase's padded training set.
    consts: the phase's :class:`PhaseConstants`.
    key: the epoch's PRNG key (order and augmentation).
    learning_rate: this epoch's SGD learning rate.
    num_steps: static step count of the padded capacity; steps past ``ceil(size / batch)`` are
      skipped by ``lax.cond``.
    batch_size: rows per step.
    **step_kwargs: the static arguments of :func:`train_step`, and ``mesh``.

  Returns:
    The new state and the epoch's metrics.
  """
  carry, order, aug_key = _epoch_start(state, key, learning_rate, data.size,
                                       data.labels.shape[0])

  def body(c, i):
    run = lambda c: _epoch_step(c, i, order, aug_key, teacher, data, consts,
                                batch_size=batch_size, **step_kwargs)
    return jax.lax.cond(i * batch_size < data.size, run, lambda c: c, c), None

  carry, _ = jax.lax.scan(body, carry, jnp.arange(num_steps))
  return _epoch_end(carry, consts)


def train_epochs(state: TrainState, teacher, data: PhaseData, consts: PhaseConstants, keys,
                 learning_rates, **epoch_kwargs):
  """Several epochs in one compiled call (``lax.scan`` over :func:`train_epoch`).

  ``keys`` and ``learning_rates`` hold one entry per epoch; the metrics come back stacked the same
  way. Running the epochs between two checkpoints in one call keeps the host out of the loop.
  """
  def one_epoch(s, key_and_lr):
    key, lr = key_and_lr
    return train_epoch(s, teacher, data, consts, key, lr, **epoch_kwargs)

  return jax.lax.scan(one_epoch, state, (keys, learning_rates))


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


class StepFns(NamedTuple):
  """The compiled functions of one step kind (base or incremental phase).

  ``train_epochs(state, teacher, data, consts, keys [E], lrs [E]) -> (state, metrics [E])`` runs E
  epochs: as one ``lax.scan`` (``epoch_as_scan``, the fast path on GPU/TPU) or as a host loop over
  a jitted step (XLA:CPU runs convolutions inside loops an order of magnitude slower).
  ``evaluate`` and ``features`` take chunks of images.
  """
  train_epochs: Callable[..., Any]
  evaluate: Callable[..., Any]
  features: Callable[..., Any]


def make_step_fns(model, tx, method: Method, train_augment, test_augment, *, batch_size: int,
                  num_steps: int, incremental: bool, epoch_as_scan: bool, mesh=None) -> StepFns:
  """Builds the jitted step functions of one step kind; the train state is donated."""
  step_kwargs = dict(model=model, tx=tx, method=method, augment=train_augment,
                     incremental=incremental)
  eval_kwargs = dict(model=model, augment=test_augment, mesh=mesh)
  evaluate_fn = jax.jit(functools.partial(evaluate, **eval_kwargs))
  features_fn = jax.jit(functools.partial(extract_features, **eval_kwargs))
  if epoch_as_scan:
    epochs = jax.jit(functools.partial(train_epochs, num_steps=num_steps, batch_size=batch_size,
                                       mesh=mesh, **step_kwargs), donate_argnums=(0,))
    return StepFns(epochs, evaluate_fn, features_fn)

  start = jax.jit(functools.partial(_epoch_start, capacity=num_steps * batch_size),
                  donate_argnums=(0,))
  step = jax.jit(functools.partial(_epoch_step, batch_size=batch_size, mesh=mesh, **step_kwargs),
                 donate_argnums=(0,))
  end = jax.jit(_epoch_end, donate_argnums=(0,))

  def looped_epochs(state, teacher, data, consts, keys, learning_rates):
    per_epoch = []
    for e in range(keys.shape[0]):
      carry, order, aug_key = start(state, keys[e], learning_rates[e], data.size)
      for i in range(-(-int(data.size) // batch_size)):
        carry = step(carry, jnp.int32(i), order, aug_key, teacher, data, consts)
      state, m = end(carry, consts)
      per_epoch.append(m)
    return state, jax.tree.map(lambda *m: jnp.stack(m), *per_epoch)

  return StepFns(looped_epochs, evaluate_fn, features_fn)
