"""The phase state: everything a run needs to continue, as one immutable pytree.

Every leaf is an array with a leading seed axis ``S`` (independent runs trained together, by a
``lax.map`` or ``vmap``; ``S = 1`` for a single seed), so the whole state checkpoints with Orbax as
it is and a restored state continues bit-identically.
"""

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from gr_jax.reweight import gradient_reweighting


@flax.struct.dataclass
class TrainState:
  """A run's state between two epochs (all leaves carry the seed axis first).

  Attributes:
    params: model parameters ``{'backbone': ..., 'classifier': {'kernel', 'bias'}}``.
    batch_stats: BatchNorm running statistics.
    opt_state: the optax chain's state, the GR state (cumulative norms Φ) included; re-created at
      every phase, as the reference re-creates its optimiser.
    teacher_params: frozen copy of ``params`` from the end of the previous phase (KD target).
    teacher_batch_stats: its BatchNorm statistics.
    key: the seed's root PRNG key (raw uint32 data); epoch keys are derived from it by folding in the
      phase and epoch, so a resumed run draws the same numbers.
    phase: the phase being trained (int32).
    epoch: epochs of ``phase`` already done (int32); equals the epoch count once training of the
      phase is over and only the phase-end work (memory, evaluation) remains.
    step: optimiser steps done in the run (int32).
    memory: int32 ``[C, M]`` exemplar memory as indices into the training set, −1 = empty slot.
    train_counts: int32 ``[C]`` training images per class position (N_c).
    correct_tag: int32 ``[T, C]`` test images classified correctly after each phase (task-agnostic).
    correct_taw: int32 ``[T, C]`` the same with the task known (argmax inside the task).
  """
  params: Any
  batch_stats: Any
  opt_state: Any
  teacher_params: Any
  teacher_batch_stats: Any
  key: jax.Array
  phase: jax.Array
  epoch: jax.Array
  step: jax.Array
  memory: jax.Array
  train_counts: jax.Array
  correct_tag: jax.Array
  correct_taw: jax.Array


def classifier_selector(params: Any) -> Any:
  """Selects the classifier leaves of a gr_jax model's params for the reweighting transform."""
  return {name: jax.tree.map(lambda _: name == "classifier", sub) for name, sub in params.items()}


def make_optimizer(*, reweighting: bool, weight_decay: float, momentum: float,
                   clip_norm: float | None) -> optax.GradientTransformationExtraArgs:
  """SGD as torch does it: (GR/DGR) → weight decay on the result → momentum, with an injected lr.

  The learning rate lives in the state (``inject_hyperparams``) so the trainer can set it per epoch
  without recompiling.
  """
  parts = []
  if reweighting:
    parts.append(gradient_reweighting(classifier_selector))
  if clip_norm:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(optax.inject_hyperparams(optax.sgd)(learning_rate=0.0, momentum=momentum))
  return optax.chain(*parts)


def set_learning_rate(opt_state: Any, learning_rate: jax.Array) -> Any:
  """Returns ``opt_state`` with the injected SGD learning rate replaced (any leading axes)."""
  *head, sgd = opt_state
  lr = jnp.broadcast_to(jnp.asarray(learning_rate, sgd.hyperparams["learning_rate"].dtype),
                        sgd.hyperparams["learning_rate"].shape)
  hyper = dict(sgd.hyperparams, learning_rate=lr)
  return tuple(head) + (sgd._replace(hyperparams=hyper),)


def init_variables(model: nn.Module, key: jax.Array, input_shape: tuple[int, ...]) -> tuple[Any, Any]:
  variables = model.init(key, jnp.zeros((1,) + tuple(input_shape), jnp.float32), train=False)
  return variables["params"], variables["batch_stats"]


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                       input_shape: tuple[int, ...], num_phases: int, memory_per_class: int,
                       train_counts: jax.Array) -> TrainState:
  """A fresh single-seed state (no seed axis; ``vmap`` it over keys for several seeds)."""
  init_key, run_key = jax.random.split(key)
  params, batch_stats = init_variables(model, init_key, input_shape)
  num_classes = train_counts.shape[0]
  return TrainState(
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
      # Own buffers: train steps donate params and batch stats, the teacher must not alias them.
      teacher_params=jax.tree.map(jnp.copy, params),
      teacher_batch_stats=jax.tree.map(jnp.copy, batch_stats),
      key=jax.random.key_data(run_key),
      phase=jnp.zeros((), jnp.int32),
      epoch=jnp.zeros((), jnp.int32),
      step=jnp.zeros((), jnp.int32),
      memory=jnp.full((num_classes, memory_per_class), -1, jnp.int32),
      train_counts=jnp.asarray(train_counts, jnp.int32),
      correct_tag=jnp.zeros((num_phases, num_classes), jnp.int32),
      correct_taw=jnp.zeros((num_phases, num_classes), jnp.int32))
