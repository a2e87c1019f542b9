"""The phase loop: the only place that sequences data, training, memory, evaluation and checkpoints.

``run(config, workdir)`` trains every phase of the class-incremental protocol for one or several
seeds (together in one program, ``config.seed_execution``), resumes from the latest checkpoint in
``workdir`` and writes ``results.json``, ``metrics.jsonl``, TensorBoard events and ``accuracy.png``
there.
"""

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple, Optional

from absl import logging
from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gr_jax import checkpoint as ckpt
from gr_jax import exemplars
from gr_jax import metrics
from gr_jax import models
from gr_jax import parallel
from gr_jax import provenance
from gr_jax import report
from gr_jax import state as state_lib
from gr_jax import steps
from gr_jax.data import augment
from gr_jax.data import protocol
from gr_jax.data import sources
from gr_jax.phase_constants import phase_constants

EpochHook = Callable[[dict[str, Any]], None]


class TestSet(NamedTuple):
  """The test images of every class of the run, padded to whole evaluation chunks, on device."""
  images: jax.Array         # uint8 [N, H, W, 3]
  labels: jax.Array         # int32 [N] class positions
  valid: jax.Array          # bool [N], False for padding
  task_of_class: jax.Array  # int32 [C]
  num_test: np.ndarray      # int [C] test images per class (host)


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything derived from the config once: data, plan, model, optimiser, compiled steps."""
  config: ml_collections.ConfigDict
  dataset: sources.Dataset
  plan: protocol.Plan
  seeds: tuple[int, ...]
  model: Any
  tx: Any
  method: steps.Method
  mesh: Any
  capacity: int
  test: TestSet
  base_steps: steps.StepFns
  incremental_steps: steps.StepFns
  reinit_heads: Callable[..., Any]
  init_optimizer: Callable[..., Any]


def parse_seeds(config) -> tuple[int, ...]:
  if config.get("seeds"):
    try:
      seeds = tuple(int(s) for s in str(config.seeds).split(",") if s.strip())
    except ValueError:
      raise ValueError(f"config.seeds={config.seeds!r}: give comma-separated integers, e.g. "
                       "--config.seeds=0,1,2") from None
    if len(set(seeds)) != len(seeds):
      raise ValueError(f"config.seeds={config.seeds!r} repeats a seed")
    return seeds
  return (int(config.seed),)


def method_from_config(config) -> steps.Method:
  m = config.method
  return steps.Method(reweighting=m.reweighting, kd=m.kd, logit_prior=m.logit_prior,
                      temperature=m.temperature)


def _memory_slots(plan: protocol.Plan, phase: int, per_class: int) -> int:
  start, _ = plan.class_range(phase)
  return int(np.minimum(plan.train_counts[:start], per_class).sum())


def _log_phase_data(plan: protocol.Plan, phase: int, per_class: int) -> None:
  """One line per phase: what it trains on, and how many old classes hold fewer training images
  than the exemplar budget, so that the memory keeps them whole (full replay: expected for the tail
  classes of a long-tailed set, and not an error)."""
  start, stop = plan.class_range(phase)
  head = (f"phase {phase} (of 0-{plan.num_phases - 1}): {len(plan.train_idx[phase])} images of "
          f"{stop - start} new classes")
  if not start:
    logging.info("%s, no memory yet", head)
    return
  logging.info("%s + memory of %d old classes: %d images, at most %d per class; classes kept whole "
               "(fewer than %d training images): %d", head, start,
               _memory_slots(plan, phase, per_class), per_class, per_class,
               int(np.sum(plan.train_counts[:start] < per_class)))


def _round_up(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def model_and_optimizer(config: ml_collections.ConfigDict, num_classes: int,
                        method: steps.Method) -> tuple[nn.Module, optax.GradientTransformation]:
  """The Flax model and the optax chain that ``config`` trains ``method`` with.

  One definition for the trainer and ``launch/bench.py``, so the benchmark times the step the
  protocol runs.
  """
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.dtype]
  model = models.create_model(config.model, num_classes, dtype,
                              bn_fast_variance=config.bn_fast_variance)
  tx = state_lib.make_optimizer(reweighting=method.reweighting != "none",
                                weight_decay=config.optim.weight_decay,
                                momentum=config.optim.momentum,
                                clip_norm=config.optim.clip_norm or None)
  return model, tx


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
  """Loads data, plans the phases and compiles nothing yet (jit is lazy)."""
  validate_config(config)
  d = config.data
  dataset = sources.load_dataset(d.source, name=d.name or None, path=d.path or None,
                                 data_dir=d.data_dir or None, image_size=d.image_size or None,
                                 download=d.download)
  p = config.protocol
  plan = protocol.make_plan(
      dataset.y_train, dataset.y_test, dataset_name=dataset.name, scenario=p.scenario,
      profile=p.profile, rho=p.rho, nc_first_task=p.nc_first_task or None,
      num_tasks=p.num_tasks, val_fraction=p.val_fraction, seed=p.order_seed, lt_seed=p.lt_seed,
      num_classes=p.num_classes or None, max_train_per_class=p.max_train_per_class or None,
      max_test_per_class=p.max_test_per_class or None)
  per_class = config.memory.per_class
  capacity = max(len(plan.train_idx[t]) + _memory_slots(plan, t, per_class)
                 for t in range(plan.num_phases))
  mesh = parallel.make_mesh(config.num_devices or None)
  batch = config.optim.batch_size
  parallel.check_batch(batch, mesh)
  capacity = _round_up(capacity, batch)
  method = method_from_config(config)
  model, tx = model_and_optimizer(config, plan.num_classes, method)
  train_aug, test_aug = augment.get_augmentation(config.augment, d.image_size)
  test = _test_set(dataset, plan, _eval_chunk(config, mesh), mesh)
  step_mesh = mesh if mesh.size > 1 else None
  scan = {"auto": jax.default_backend() != "cpu", "true": True, "false": False}[
      str(config.epoch_as_scan).lower()]
  make = lambda incremental: steps.make_step_fns(
      model, tx, method, train_aug, test_aug, batch_size=batch, num_steps=capacity // batch,
      incremental=incremental, epoch_as_scan=scan, mesh=step_mesh,
      seed_execution=config.seed_execution)
  shape = (d.image_size, d.image_size, 3)

  def reinit(params, key_data, new_classes, phase):
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data), 1000 + phase)
    fresh, _ = state_lib.init_variables(model, key, shape)
    return dict(params, classifier=jax.tree.map(
        lambda old, f: jnp.where(new_classes, f, old), params["classifier"], fresh["classifier"]))

  return Experiment(config=config, dataset=dataset, plan=plan, seeds=parse_seeds(config),
                    model=model, tx=tx, method=method, mesh=mesh, capacity=capacity, test=test,
                    base_steps=make(False), incremental_steps=make(True),
                    reinit_heads=jax.jit(jax.vmap(reinit, in_axes=(0, 0, None, None))),
                    init_optimizer=jax.jit(jax.vmap(tx.init)))


def _require_positive_int(config, key: str, problem: str) -> None:
  """ValueError ``config.<key>=<value>: <problem>`` unless the entry is an int >= 1 (not a bool)."""
  value = config
  for part in key.split("."):
    value = value[part]
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"config.{key}={value!r}: {problem}")


def _check_optimiser(config) -> None:
  """The SGD schedule's entries: counts positive, rates in range, milestones increasing epochs."""
  for key in ("optim.epochs", "optim.batch_size"):
    _require_positive_int(config, key, "must be an integer >= 1")
  optim = config.optim
  for key, in_range, meaning in (("learning_rate", lambda v: v > 0, "> 0"),
                                 ("lr_decay", lambda v: v > 0, "> 0 (0.1: ÷10 at each milestone)"),
                                 ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
                                 ("weight_decay", lambda v: v >= 0, ">= 0"),
                                 ("clip_norm", lambda v: v >= 0, ">= 0 (0: no clipping)")):
    value = optim[key]
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        or not in_range(value)):
      raise ValueError(f"config.optim.{key}={value!r}: must be a finite number {meaning}")
  milestones = optim.milestones
  if (not isinstance(milestones, (tuple, list))
      or not all(isinstance(m, int) and not isinstance(m, bool) for m in milestones)
      or any(m < 1 for m in milestones) or list(milestones) != sorted(set(milestones))):
    raise ValueError(f"config.optim.milestones={milestones!r}: give increasing epoch numbers "
                     "(the learning rate is multiplied by lr_decay at each), e.g. "
                     "--config.optim.milestones=80,120, or () for a constant rate")
  late = [m for m in milestones if m >= optim.epochs]
  if late:
    logging.warning("config.optim.milestones %s reach no epoch of a %d-epoch phase: the learning "
                    "rate does not decay there", late, optim.epochs)


def validate_config(config) -> None:
  if str(config.epoch_as_scan).lower() not in ("auto", "true", "false"):
    raise ValueError(f"config.epoch_as_scan={config.epoch_as_scan!r}: use auto, true or false")
  if config.seed_execution not in steps.SEED_EXECUTIONS:
    raise ValueError(f"config.seed_execution={config.seed_execution!r}: use one of "
                     f"{steps.SEED_EXECUTIONS}")
  if config.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.dtype={config.dtype!r}: use float32 or bfloat16")
  parallel.check_num_devices(config.num_devices)  # before the data is read
  _require_positive_int(config, "memory.per_class", "the exemplar budget must be a positive "
                        "integer (images kept per old class, 20 in the paper)")
  if config.memory.selection not in ("herding", "random"):
    raise ValueError(f"config.memory.selection={config.memory.selection!r}: use herding or random")
  _check_optimiser(config)
  _require_positive_int(config, "checkpoint.every_epochs", "must be an integer >= 1 (epochs "
                        "between checkpoints; phase ends always save)")
  _require_positive_int(config, "checkpoint.keep", "must be an integer >= 1 (checkpoints kept; "
                        "with none a run cannot resume)")


def _padded(images, labels, idx: np.ndarray, length: int, plan: protocol.Plan):
  """Rows ``idx`` of a dataset split (decoded once) and their class positions, zero-padded."""
  x = images[idx]
  out_x = np.zeros((length,) + tuple(x.shape[1:]), np.uint8)
  out_x[:len(idx)] = x
  out_y = np.zeros((length,), np.int32)
  out_y[:len(idx)] = plan.positions(labels[idx])
  return out_x, out_y


def _test_set(dataset, plan, chunk, mesh):
  idx = np.concatenate(plan.test_idx)
  n = _round_up(len(idx), chunk)
  images, labels = _padded(dataset.x_test, dataset.y_test, idx, n, plan)
  valid = np.arange(n) < len(idx)
  num_test = np.bincount(labels[valid], minlength=plan.num_classes)
  task_of_class = plan.phase_of_class.astype(np.int32)
  put = lambda a: parallel.replicate(jnp.asarray(a), mesh)
  return TestSet(put(images), put(labels), put(valid), put(task_of_class), num_test)


def _eval_chunk(config, mesh) -> int:
  return _round_up(config.eval_chunk, mesh.size)


def _chunks(n: int, chunk: int):
  return [slice(i, i + chunk) for i in range(0, n, chunk)]


def _epoch_keys(key_data, phase: int, epoch: int, count: int) -> jax.Array:
  """``[S, count]`` keys of epochs ``epoch..epoch+count-1``: fold_in(fold_in(seed key, phase), e)."""
  def seed_keys(k):
    phase_key = jax.random.fold_in(jax.random.wrap_key_data(k), phase)
    return jax.vmap(lambda e: jax.random.fold_in(phase_key, e))(epoch + jnp.arange(count))
  return jax.vmap(seed_keys)(key_data)


def _learning_rate(optim, epoch: int) -> float:
  return optim.learning_rate * optim.lr_decay ** sum(epoch >= m for m in optim.milestones)


def _phase_data(exp: Experiment, state: state_lib.TrainState, phase: int) -> steps.PhaseData:
  """New-class images of ``phase`` plus each seed's exemplars, padded to the capacity."""
  plan, ds = exp.plan, exp.dataset
  memory = np.asarray(state.memory)
  images, labels, sizes = [], [], []
  for s in range(len(exp.seeds)):
    kept = memory[s][memory[s] >= 0]
    idx = np.concatenate([plan.train_idx[phase], kept]).astype(np.int64)
    padded, y = _padded(ds.x_train, ds.y_train, idx, exp.capacity, plan)
    images.append(padded)
    labels.append(y)
    sizes.append(len(idx))
  if len(set(sizes)) != 1:
    raise AssertionError(f"seeds hold different numbers of exemplars: {sizes}")
  put = lambda a: parallel.replicate(jnp.asarray(a), exp.mesh)
  return steps.PhaseData(put(np.stack(images)), put(np.stack(labels)),
                         put(np.int32(sizes[0])))


def _constants(exp: Experiment, phase: int):
  start, stop = exp.plan.class_range(phase)
  c = exp.config
  return parallel.replicate(
      phase_constants(exp.plan.train_counts, start, stop - start, c.memory.per_class,
                      c.method.kd_lambda_base, c.method.temperature), exp.mesh)


def init_state(exp: Experiment) -> state_lib.TrainState:
  shape = (exp.config.data.image_size, exp.config.data.image_size, 3)
  keys = jnp.stack([jax.random.key(s) for s in exp.seeds])
  create = lambda k: state_lib.create_train_state(
      exp.model, exp.tx, k, shape, exp.plan.num_phases, exp.config.memory.per_class,
      jnp.asarray(exp.plan.train_counts))
  return parallel.replicate(jax.jit(jax.vmap(create))(keys), exp.mesh)


def _fresh_heads(exp: Experiment, state: state_lib.TrainState, phase: int):
  """Params whose classifier rows of ``phase``'s new classes are freshly initialised.

  The reference adds a new, freshly initialised head at every phase; here the classifier covers all
  classes from the start, so the rows of the arriving classes are re-drawn (they were only decayed
  by weight decay while unseen).
  """
  start, stop = exp.plan.class_range(phase)
  position = np.arange(exp.plan.num_classes)
  new = jnp.asarray((position >= start) & (position < stop))
  return exp.reinit_heads(state.params, state.key, new, jnp.int32(phase))


def _finish_phase(exp: Experiment, state: state_lib.TrainState, phase: int):
  """Herding of the phase's new classes, evaluation, and the next phase's fresh start."""
  plan, cfg = exp.plan, exp.config
  fns = exp.incremental_steps if phase else exp.base_steps
  start, stop = plan.class_range(phase)
  idx = plan.train_idx[phase]
  chunk = _eval_chunk(cfg, exp.mesh)
  n = _round_up(len(idx), chunk)
  images, labels = _padded(exp.dataset.x_train, exp.dataset.y_train, idx, n, plan)
  labels = labels[:len(idx)]
  seeds = len(exp.seeds)
  feats = np.concatenate([
      parallel.to_host(fns.features(state.params, state.batch_stats, parallel.replicate(
          jnp.broadcast_to(jnp.asarray(images[sl]), (seeds,) + images[sl].shape), exp.mesh)))
      for sl in _chunks(n, chunk)], axis=1)[:, :len(idx)]
  memory = np.asarray(state.memory).copy()
  for s in range(seeds):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key[s]), 2000 + phase)
    chosen = exemplars.select_exemplars(feats[s], labels, idx, list(range(start, stop)),
                                        cfg.memory.per_class, cfg.memory.selection, key)
    memory[s, start:stop] = chosen
  test = exp.test
  seen = jnp.asarray(np.arange(plan.num_classes) < stop)
  tag = taw = 0
  for sl in _chunks(test.images.shape[0], chunk):
    t_tag, t_taw = fns.evaluate(state.params, state.batch_stats, test.images[sl],
                                test.labels[sl], test.valid[sl], seen, test.task_of_class)
    tag, taw = tag + t_tag, taw + t_taw
  state = state.replace(
      memory=parallel.replicate(jnp.asarray(memory), exp.mesh),
      correct_tag=state.correct_tag.at[:, phase].set(tag),
      correct_taw=state.correct_taw.at[:, phase].set(taw),
      # Copies: the train step donates params and batch stats, the teacher must survive it.
      teacher_params=jax.tree.map(jnp.copy, state.params),
      teacher_batch_stats=jax.tree.map(jnp.copy, state.batch_stats),
      phase=state.phase + 1, epoch=jnp.zeros_like(state.epoch))
  if phase + 1 < plan.num_phases:
    # Replicated like the rest of the state, so the next epoch call hits the compiled program.
    params = parallel.replicate(_fresh_heads(exp, state, phase + 1), exp.mesh)
    state = state.replace(params=params,
                          opt_state=parallel.replicate(exp.init_optimizer(params), exp.mesh))
  return state


def _summaries(exp: Experiment, state: state_lib.TrainState) -> dict[str, Any]:
  plan = exp.plan
  num_test = exp.test.num_test
  per_seed = [metrics.summarize(np.asarray(state.correct_tag[s]), np.asarray(state.correct_taw[s]),
                                num_test, plan.task_sizes, plan.train_counts)
              for s in range(len(exp.seeds))]
  results = report.seed_summary(per_seed)
  results["seeds"] = list(exp.seeds)
  results["task_sizes"] = list(plan.task_sizes)
  results["class_order"] = [int(c) for c in plan.class_order]
  results["train_counts"] = [int(c) for c in plan.train_counts]
  return results


def run(config: ml_collections.ConfigDict, workdir: str,
        on_epoch: Optional[EpochHook] = None) -> dict[str, Any]:
  """Runs (or resumes) the whole protocol; returns the results written to ``results.json``."""
  parallel.initialize_distributed()
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir} is a file, not a directory: give a new or existing "
                     "run directory")
  exp = build_experiment(config)  # validates the config and loads the data before any file is made
  os.makedirs(workdir, exist_ok=True)
  config_dict = config.to_dict()
  checkpointer = ckpt.Checkpointer(workdir, config_dict, keep=config.checkpoint.keep,
                                  data_digest=sources.dataset_digest(exp.dataset))
  state = init_state(exp)
  restored = checkpointer.restore(ckpt.abstract_like(state))
  wall_offset = 0.0
  if restored is not None:
    state, wall_offset = restored
    if int(state.phase[0]) < exp.plan.num_phases:
      logging.info("resumed from %s at phase %d (of 0-%d), epoch %d", checkpointer.directory,
                   int(state.phase[0]), exp.plan.num_phases - 1, int(state.epoch[0]))
    else:
      logging.info("all %d phases already trained in %s; writing the results again",
                   exp.plan.num_phases, checkpointer.directory)
  lead = jax.process_index() == 0  # one process writes the run's files
  if lead:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config_dict, f, indent=2, default=str)
  started = time.time()
  elapsed = lambda: wall_offset + time.time() - started
  optim = config.optim
  epochs_per_phase = optim.epochs
  plan = exp.plan
  try:
    with (report.MetricWriter(workdir, resume_step=int(state.step[0])) if lead
          else report.NullWriter()) as writer:
      while int(state.phase[0]) < plan.num_phases:
        phase = int(state.phase[0])
        fns = exp.incremental_steps if phase else exp.base_steps
        tic = time.time()
        _log_phase_data(plan, phase, config.memory.per_class)
        data = _phase_data(exp, state, phase)
        consts = _constants(exp, phase)
        # Where this phase's time goes, in this process (a resumed phase counts its epochs since).
        timing = {"time/phase_data_s": time.time() - tic, "time/train_s": 0.0,
                  "time/checkpoint_s": 0.0}
        teacher = (state.teacher_params, state.teacher_batch_stats)
        while int(state.epoch[0]) < epochs_per_phase:
          epoch = int(state.epoch[0])
          # Epochs up to the next checkpoint run as one compiled call.
          every = config.checkpoint.every_epochs
          count = min(every - epoch % every, epochs_per_phase - epoch)
          lrs = [_learning_rate(optim, e) for e in range(epoch, epoch + count)]
          tic = time.time()
          carry = (state.params, state.batch_stats, state.opt_state, state.step)
          carry, chunk_metrics = fns.train_epochs(
              carry, teacher, data, consts, _epoch_keys(state.key, phase, epoch, count),
              jnp.asarray(lrs, jnp.float32))
          chunk_metrics = jax.tree.map(np.asarray, chunk_metrics)  # [S, count] each
          seconds = time.time() - tic
          timing["time/train_s"] += seconds
          loss = chunk_metrics["loss"]
          if not np.all(np.isfinite(loss)):
            bad = epoch + int(np.argmax(~np.isfinite(loss).all(axis=0)))
            raise FloatingPointError(
                f"non-finite loss in phase {phase}, epoch {bad} (lr {_learning_rate(optim, bad)}); "
                f"the last good checkpoint in {checkpointer.directory} is intact. Start over in "
                "a new --workdir with a lower config.optim.learning_rate (a workdir resumes only "
                "the config it was started with), or fix the input data and rerun to resume.")
          params, batch_stats, opt_state, step = carry
          state = state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state,
                                step=step, epoch=state.epoch + count)
          steps_per_epoch = -(-int(data.size) // config.optim.batch_size)
          first_step = int(step[0]) - count * steps_per_epoch
          for i in range(count):
            scalars = {f"train/{k}": float(np.mean(v[:, i])) for k, v in chunk_metrics.items()
                       if k != "examples"}
            scalars.update({"train/lr": lrs[i], "train/images_per_s":
                            float(chunk_metrics["examples"].sum()) / max(seconds, 1e-9)})
            writer.write_scalars(first_step + (i + 1) * steps_per_epoch, scalars, phase=phase,
                                 epoch=epoch + i)
            if on_epoch is not None:
              on_epoch({"phase": phase, "epoch": epoch + i, "epochs": epochs_per_phase,
                        "phases": plan.num_phases, **scalars})
          if epoch + count < epochs_per_phase:
            tic = time.time()
            checkpointer.save(phase * (epochs_per_phase + 1) + epoch + count, state, elapsed())
            timing["time/checkpoint_s"] += time.time() - tic
        tic = time.time()
        state = jax.block_until_ready(_finish_phase(exp, state, phase))
        timing["time/phase_end_s"] = time.time() - tic
        tic = time.time()
        checkpointer.save((phase + 1) * (epochs_per_phase + 1), state, elapsed())
        timing["time/checkpoint_s"] += time.time() - tic
        acc = np.asarray(state.correct_tag[:, phase]).sum(-1) / max(
            1, exp.test.num_test[:plan.class_range(phase)[1]].sum())
        writer.write_scalars(int(state.step[0]),
                             {"eval/acc_tag_weighted": 100 * float(acc.mean()), **timing},
                             phase=phase)
  finally:
    checkpointer.close()
  results = _summaries(exp, state)
  results["config"] = config_dict
  results["wall_time_s"] = elapsed()
  results["devices"] = [str(d) for d in exp.mesh.devices.flat]
  results["provenance"] = provenance.provenance(exp.mesh.devices.flat)
  if lead:
    report.write_results(workdir, results)
    report.plot_results(workdir, results, list(plan.train_counts))
  return results
