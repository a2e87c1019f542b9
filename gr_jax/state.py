"""A run's state as two immutable pytrees: what a train step updates, and the phase-level rest.

:class:`TrainState` is what ``train_step(state, batch, ...) -> (state, metrics)`` carries, as in the
Flax examples; :class:`RunState` holds it together with what the phase loop keeps between phases.
Both are plain arrays, so the whole run checkpoints with Orbax as it is and a restored run
continues bit-identically.
"""

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """What one optimiser step reads and writes.

  Attributes:
    step: optimiser steps done in the run (int32).
    params: model parameters ``{'backbone': ..., 'classifier': {'kernel', 'bias'}}``.
    batch_stats: BatchNorm running statistics.
    opt_state: the optimiser's state, the reweighting's Φ included; re-created at every phase, as
      the reference re-creates its optimiser.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


@flax.struct.dataclass
class RunState:
  """Everything a run needs to continue: the train state and the phase loop's own state.

  Attributes:
    train: the :class:`TrainState`.
    teacher_params: frozen copy of ``params`` from the end of the previous phase (KD target).
    teacher_batch_stats: its BatchNorm statistics.
    key: the seed's root PRNG key (raw uint32 data); epoch keys are derived from it by folding in the
      phase and epoch, so a resumed run draws the same numbers.
    phase: the phase being trained (int32).
    epoch: epochs of ``phase`` already done (int32); equals the epoch count once training of the
      phase is over and only the phase-end work (memory, evaluation) remains.
    memory: int32 ``[C, M]`` exemplar memory as indices into the training set, −1 = empty slot.
    correct_tag: int32 ``[T, C]`` test images classified correctly after each phase (task-agnostic).
    correct_taw: int32 ``[T, C]`` the same with the task known (argmax inside the task).
    phase_stats: sums over the current phase's steps for its diagnostics (:func:`phase_stats`).
  """
  train: TrainState
  teacher_params: Any
  teacher_batch_stats: Any
  key: jax.Array
  phase: jax.Array
  epoch: jax.Array
  memory: jax.Array
  correct_tag: jax.Array
  correct_taw: jax.Array
  phase_stats: dict[str, jax.Array]


def phase_stats(num_classes: int) -> dict[str, jax.Array]:
  """Empty sums over a phase's steps: the step count, the classifier's CE gradient-row norms
  (Φ of every class, also without reweighting) and β's sum, minimum and maximum."""
  return {"steps": jnp.zeros((), jnp.float32),
          "class_grad_norms": jnp.zeros((num_classes,), jnp.float32),
          "gr_beta_sum": jnp.zeros((), jnp.float32),
          "gr_beta_min": jnp.full((), jnp.inf, jnp.float32),
          "gr_beta_max": jnp.full((), -jnp.inf, jnp.float32)}


def init_variables(model: nn.Module, key: jax.Array, input_shape: tuple[int, ...]) -> tuple[Any, Any]:
  variables = model.init(key, jnp.zeros((1,) + tuple(input_shape), jnp.float32), train=False)
  return variables["params"], variables["batch_stats"]


def create_run_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                     input_shape: tuple[int, ...], num_phases: int, num_classes: int,
                     memory_per_class: int) -> RunState:
  """A fresh run of the seed whose root key is ``key``."""
  init_key, run_key = jax.random.split(key)
  params, batch_stats = init_variables(model, init_key, input_shape)
  return RunState(
      train=TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       opt_state=tx.init(params)),
      # Own buffers: train steps donate params and batch stats, the teacher must not alias them.
      teacher_params=jax.tree.map(jnp.copy, params),
      teacher_batch_stats=jax.tree.map(jnp.copy, batch_stats),
      key=jax.random.key_data(run_key),
      phase=jnp.zeros((), jnp.int32),
      epoch=jnp.zeros((), jnp.int32),
      memory=jnp.full((num_classes, memory_per_class), -1, jnp.int32),
      correct_tag=jnp.zeros((num_phases, num_classes), jnp.int32),
      correct_taw=jnp.zeros((num_phases, num_classes), jnp.int32),
      phase_stats=phase_stats(num_classes))
