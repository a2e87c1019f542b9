"""The phase loop: the only place that sequences data, training, memory, evaluation and checkpoints.

``run(config, workdir)`` trains every phase of the class-incremental protocol, resumes from the
latest checkpoint in ``workdir`` and writes ``results.json``, ``metrics.jsonl``, TensorBoard events
and ``accuracy.png`` there. Several seeds (``config.seeds``) train one after another in one
process, each in ``workdir/seed_<s>`` exactly as its single-seed run, reusing the compiled
programs; ``workdir/results.json`` then pools them (mean ± std).
"""

import concurrent.futures
import dataclasses
import json
import os
import signal
import threading
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
from gr_jax import config as config_lib
from gr_jax import diagnostics
from gr_jax import exemplars
from gr_jax import metrics
from gr_jax import models
from gr_jax import optim
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
  """Everything derived from the config once, shared by all its seeds: data, plan, model,
  optimiser and the jitted programs (so a second seed compiles nothing)."""
  config: ml_collections.ConfigDict
  dataset: sources.Dataset
  data_digest: str
  plan: protocol.Plan
  model: Any
  tx: Any
  mesh: Any
  capacity: int
  test: TestSet
  base_steps: steps.StepFns
  incremental_steps: steps.StepFns
  init_run: Callable[[jax.Array], state_lib.RunState]
  fresh_heads: Callable[..., Any]
  init_optimizer: Callable[..., Any]
  # (incremental, epochs per call) -> the seconds XLA takes to compile that epoch program ahead of
  # time (a future); the jitted train_epochs then finds it compiled
  compiling: dict[tuple[bool, int], concurrent.futures.Future]
  build_s: float  # loading the data, planning, tracing the programs: once, for every seed

  def wait_compiled(self) -> list[float]:
    """Waits for the epoch programs compiled ahead of time; their compile seconds."""
    return [future.result() for future in self.compiling.values()]


def ceil_div(n: int, d: int) -> int:
  return -(-n // d)


def _round_up(n: int, multiple: int) -> int:
  return max(multiple, ceil_div(n, multiple) * multiple)


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


def model_and_optimizer(config: ml_collections.ConfigDict,
                        num_classes: int) -> tuple[nn.Module, optax.GradientTransformation]:
  """The Flax model and the optimiser (:func:`gr_jax.dgr_sgd`, its rate injected so that it can
  change per epoch without recompiling) that ``config`` trains with.

  One definition for the trainer and ``launch/bench.py``, so the benchmark times the step the
  protocol runs.
  """
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.dtype]
  model = models.create_model(config.model, num_classes, dtype,
                              bn_fast_variance=config.bn_fast_variance)
  tx = optax.inject_hyperparams(optim.dgr_sgd, static_args=("classifier", "reweighting",
                                                             "clip_norm"))(
      learning_rate=0.0, momentum=config.optim.momentum, weight_decay=config.optim.weight_decay,
      classifier=models.classifier_mask, reweighting=config.method.reweighting != "none",
      clip_norm=config.optim.clip_norm)
  return model, tx


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
  """Loads data, plans the phases and builds the jitted programs: the two epoch programs start
  compiling in the background, the others compile on first use."""
  started = time.time()
  config_lib.validate(config)
  parallel.check_num_devices(config.num_devices)  # before the data is read
  d = config.data
  dataset = sources.load_dataset(d.source, name=d.name, path=d.path, data_dir=d.data_dir,
                                 image_size=d.image_size, download=d.download)
  p = config.protocol
  plan = protocol.make_plan(
      dataset.y_train, dataset.y_test, dataset_name=dataset.name, scenario=p.scenario,
      profile=p.profile, rho=p.rho, nc_first_task=p.nc_first_task, num_tasks=p.num_tasks,
      val_fraction=p.val_fraction, seed=p.order_seed, lt_seed=p.lt_seed,
      num_classes=p.num_classes, max_train_per_class=p.max_train_per_class,
      max_test_per_class=p.max_test_per_class)
  per_class = config.memory.per_class
  capacity = max(len(plan.train_idx[t]) + _memory_slots(plan, t, per_class)
                 for t in range(plan.num_phases))
  mesh = parallel.make_mesh(config.num_devices)
  batch = config.optim.batch_size
  parallel.check_batch(batch, mesh)
  capacity = _round_up(capacity, batch)
  method = steps.Method.from_config(config)
  model, tx = model_and_optimizer(config, plan.num_classes)
  train_aug, test_aug = augment.get_augmentation(config.augment, d.image_size)
  scan = {"auto": jax.default_backend() != "cpu", "true": True, "false": False}[
      str(config.epoch_as_scan).lower()]
  make = lambda incremental: steps.make_step_fns(
      model, tx, method, train_aug, test_aug, batch_size=batch, num_steps=capacity // batch,
      incremental=incremental, epoch_as_scan=scan, mesh=mesh if mesh.size > 1 else None)
  shape = (d.image_size, d.image_size, 3)

  def fresh_heads(params, key_data, new_classes, phase):
    """``params`` with the classifier rows of ``new_classes`` freshly initialised: the reference
    adds a new head at every phase; here the classifier covers all classes from the start."""
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data), 1000 + phase)
    fresh, _ = state_lib.init_variables(model, key, shape)
    return dict(params, classifier=jax.tree.map(
        lambda old, f: jnp.where(new_classes, f, old), params["classifier"], fresh["classifier"]))

  init_run = jax.jit(lambda key: state_lib.create_run_state(
      model, tx, key, shape, plan.num_phases, plan.num_classes, per_class))
  base_steps, incremental_steps = make(False), make(True)
  kinds = {False: base_steps, True: incremental_steps}
  if plan.num_phases == 1:
    del kinds[True]
  count = min(config.epochs_per_call, config.optim.epochs)
  compiling = _compile_ahead(kinds, _abstract_epoch_args(
      init_run, _phase_constants(plan, config, mesh, 0), mesh, capacity, shape, count), count)
  return Experiment(  # the test images decode and upload while the programs compile
      config=config, dataset=dataset, data_digest=sources.dataset_digest(dataset), plan=plan,
      model=model, tx=tx, mesh=mesh, capacity=capacity,
      test=_test_set(dataset, plan, _eval_chunk(config, mesh), mesh),
      base_steps=base_steps, incremental_steps=incremental_steps, init_run=init_run,
      fresh_heads=jax.jit(fresh_heads), init_optimizer=jax.jit(tx.init), compiling=compiling,
      build_s=time.time() - started)


def _abstract_epoch_args(init_run, consts, mesh, capacity: int, image_shape, count: int) -> tuple:
  """Shapes, dtypes and shardings of ``train_epochs``' arguments, the same in every phase: those of
  a fresh run's state, a padded phase and ``count`` epochs (one compile per step kind is tested)."""
  replicated = parallel.replicated(mesh)
  spec = lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated,
                                        weak_type=s.weak_type)
  abstract = lambda tree: jax.tree.map(spec, jax.eval_shape(lambda t: t, tree))
  run = jax.tree.map(spec, jax.eval_shape(init_run, jax.random.key(0)))
  data = steps.PhaseData(
      images=spec(jax.ShapeDtypeStruct((capacity, *image_shape), jnp.uint8)),
      labels=spec(jax.ShapeDtypeStruct((capacity,), jnp.int32)),
      size=spec(jax.ShapeDtypeStruct((), jnp.int32)))
  keys = jax.tree.map(spec, jax.eval_shape(lambda: jax.random.split(jax.random.key(0), count)))
  return (run.train, (run.teacher_params, run.teacher_batch_stats), data, abstract(consts), keys,
          spec(jax.ShapeDtypeStruct((count,), jnp.float32)))


def _compile_ahead(kinds: dict[bool, steps.StepFns], args: tuple,
                   count: int) -> dict[tuple[bool, int], concurrent.futures.Future]:
  """Starts compiling the scanned epoch program of each step kind in a background thread.

  XLA compiles the phase-0 and the incremental program while the test images load and the run
  state is made, instead of inside the first calls of phases 0 and 1. One after the other: XLA's
  autotuning times kernels on the GPU, and two compilations at once stalled a bfloat16 build for
  over two minutes on an H200 (delay-kernel timeouts; BENCHMARKS.md). Tracing stays in the calling
  thread. The loop waits for both before it trains, so no compilation overlaps training. Empty for
  host-loop epochs (the CPU default), whose small programs compile on first use.
  """
  if not all(hasattr(fns.train_epochs, "lower") for fns in kinds.values()):
    return {}
  lowered = {incremental: fns.train_epochs.lower(*args) for incremental, fns in kinds.items()}

  def compile_(program):
    tic = time.time()
    program.compile()  # into the jitted function's own cache: its calls with these shapes find it
    return time.time() - tic

  pool = concurrent.futures.ThreadPoolExecutor(1, "compile")
  futures = {(incremental, count): pool.submit(compile_, program)
             for incremental, program in lowered.items()}
  pool.shutdown(wait=False)  # its thread ends with the last compilation
  return futures


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
  """``[count]`` keys of epochs ``epoch..epoch+count-1``: fold_in(fold_in(seed key, phase), e)."""
  phase_key = jax.random.fold_in(jax.random.wrap_key_data(key_data), phase)
  return jax.vmap(lambda e: jax.random.fold_in(phase_key, e))(epoch + jnp.arange(count))


def _learning_rate(optim_config, epoch: int) -> float:
  return optim_config.learning_rate * optim_config.lr_decay ** sum(
      epoch >= m for m in optim_config.milestones)


def phase_data(exp: Experiment, run: state_lib.RunState, phase: int) -> steps.PhaseData:
  """New-class images of ``phase`` plus the exemplars in memory, padded to the capacity."""
  memory = np.asarray(run.memory)
  idx = np.concatenate([exp.plan.train_idx[phase], memory[memory >= 0]]).astype(np.int64)
  images, labels = _padded(exp.dataset.x_train, exp.dataset.y_train, idx, exp.capacity, exp.plan)
  put = lambda a: parallel.replicate(jnp.asarray(a), exp.mesh)
  return steps.PhaseData(put(images), put(labels), put(np.int32(len(idx))))


def _phase_constants(plan: protocol.Plan, config, mesh, phase: int):
  start, stop = plan.class_range(phase)
  return parallel.replicate(
      phase_constants(plan.train_counts, start, stop - start, config.memory.per_class,
                      config.method.kd_lambda_base, config.method.temperature), mesh)


def constants(exp: Experiment, phase: int):
  """The :class:`~gr_jax.phase_constants.PhaseConstants` of ``phase``, on the run's devices."""
  return _phase_constants(exp.plan, exp.config, exp.mesh, phase)


def _select_memory(exp: Experiment, run: state_lib.RunState, phase: int) -> np.ndarray:
  """The memory with ``phase``'s new classes' exemplars chosen on backbone features (herding)."""
  plan, cfg = exp.plan, exp.config
  fns = exp.incremental_steps if phase else exp.base_steps
  start, stop = plan.class_range(phase)
  idx = plan.train_idx[phase]
  chunk = _eval_chunk(cfg, exp.mesh)
  images, labels = _padded(exp.dataset.x_train, exp.dataset.y_train, idx,
                           _round_up(len(idx), chunk), exp.plan)
  params, batch_stats = run.train.params, run.train.batch_stats
  feats = np.concatenate([
      parallel.to_host(fns.features(params, batch_stats,
                                    parallel.replicate(jnp.asarray(images[sl]), exp.mesh)))
      for sl in _chunks(len(images), chunk)])[:len(idx)]
  key = jax.random.fold_in(jax.random.wrap_key_data(run.key), 2000 + phase)
  memory = np.asarray(run.memory).copy()
  memory[start:stop] = exemplars.select_exemplars(
      feats, labels[:len(idx)], idx, list(range(start, stop)), cfg.memory.per_class,
      cfg.memory.selection, key)
  return memory


def _evaluate(exp: Experiment, run: state_lib.RunState, phase: int):
  """Per-class correct counts (TAg, TAw) on the test images of every class seen so far."""
  fns = exp.incremental_steps if phase else exp.base_steps
  test = exp.test
  seen = jnp.asarray(np.arange(exp.plan.num_classes) < exp.plan.class_range(phase)[1])
  tag = taw = 0
  for sl in _chunks(test.images.shape[0], _eval_chunk(exp.config, exp.mesh)):
    t_tag, t_taw = fns.evaluate(run.train.params, run.train.batch_stats, test.images[sl],
                                test.labels[sl], test.valid[sl], seen, test.task_of_class)
    tag, taw = tag + t_tag, taw + t_taw
  return tag, taw


def _finish_phase(exp: Experiment, run: state_lib.RunState, phase: int) -> state_lib.RunState:
  """Herding of the phase's new classes, evaluation, and the next phase's fresh start."""
  memory = _select_memory(exp, run, phase)
  tag, taw = _evaluate(exp, run, phase)
  train = run.train
  run = run.replace(
      memory=parallel.replicate(jnp.asarray(memory), exp.mesh),
      correct_tag=run.correct_tag.at[phase].set(tag),
      correct_taw=run.correct_taw.at[phase].set(taw),
      # Copies: the train step donates params and batch stats, the teacher must survive it.
      teacher_params=jax.tree.map(jnp.copy, train.params),
      teacher_batch_stats=jax.tree.map(jnp.copy, train.batch_stats),
      phase=run.phase + 1, epoch=jnp.zeros_like(run.epoch),
      phase_stats=parallel.replicate(state_lib.phase_stats(exp.plan.num_classes), exp.mesh))
  if phase + 1 < exp.plan.num_phases:
    start, stop = exp.plan.class_range(phase + 1)
    position = np.arange(exp.plan.num_classes)
    new = jnp.asarray((position >= start) & (position < stop))
    # Replicated like the rest of the state, so the next epoch call hits the compiled program.
    params = parallel.replicate(exp.fresh_heads(train.params, run.key, new, jnp.int32(phase + 1)),
                                exp.mesh)
    run = run.replace(train=train.replace(
        params=params, opt_state=parallel.replicate(exp.init_optimizer(params), exp.mesh)))
  return run


def _phase_accuracy(exp: Experiment, run: state_lib.RunState, phase: int) -> dict[str, float]:
  """After ``phase``: A_t, the mean over the tasks seen of their TAg accuracy (what papers plot),
  and the accuracy over all seen test images pooled."""
  correct = np.asarray(run.correct_tag[phase])
  num_test = exp.test.num_test
  stop = exp.plan.class_range(phase)[1]
  tasks = [slice(*exp.plan.class_range(u)) for u in range(phase + 1)]
  per_task = [correct[t].sum() / max(1, num_test[t].sum()) for t in tasks]
  return {"eval/acc_tag": 100 * float(np.mean(per_task)),
          "eval/acc_tag_weighted": 100 * float(correct[:stop].sum() / max(1, num_test[:stop].sum()))}


class Stopped(Exception):
  """The run stopped on SIGTERM / SIGINT after saving a checkpoint; the same command resumes it."""

  def __init__(self, signum: int, directory: str, phase: int, epoch: int):
    self.signum = signum
    super().__init__(f"stopped by {signal.Signals(signum).name} in phase {phase} after epoch "
                     f"{epoch}; checkpoint saved in {directory}: rerun the same command to resume")


class _Signals:
  """While entered (in the main thread), SIGTERM and SIGINT are remembered instead of killing the
  process, so the loop can save and stop between two compiled calls; a second one stops at once."""

  def __init__(self):
    self.received = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.received is not None:
      raise KeyboardInterrupt
    logging.warning("%s received: saving a checkpoint after the current call, then stopping",
                    signal.Signals(signum).name)
    self.received = signum

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class _CompileClock:
  """Seconds XLA spent compiling in this thread while entered (JAX's backend-compile events; the
  programs compiled ahead of time in threads of their own are not counted)."""

  def __init__(self):
    self.seconds = 0.0
    self._thread = threading.current_thread()

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if (event == "/jax/core/compile/backend_compile_duration"
        and threading.current_thread() is self._thread):
      self.seconds += duration

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)


class _Chunk(NamedTuple):
  """A compiled call's epochs, dispatched; its metrics are read when the next call is on its way."""
  epoch: int
  learning_rates: list[float]
  metrics: dict[str, jax.Array]  # [count] per entry (class_grad_norms [count, C])
  started: float  # when the call was made
  # Its seconds if it had finished when the call returned: on GPUs a scanned epoch's loop and
  # conditionals make the host wait for the device inside the call.
  seconds: Optional[float]


@dataclasses.dataclass
class _SeedLoop:
  """The phase loop of one seed: dispatch, metrics, the save policy, signals and diagnostics."""
  exp: Experiment
  workdir: str
  checkpointer: ckpt.Checkpointer
  writer: Any
  elapsed: Callable[[], float]
  on_epoch: Optional[EpochHook]
  signals: _Signals
  diag: Optional[dict[str, np.ndarray]] = None
  last_save: float = dataclasses.field(default_factory=time.time)
  last_fetch: float = 0.0
  time_split: dict[str, float] = dataclasses.field(default_factory=dict)  # summed over phases

  def _record(self, phase: int, chunk: _Chunk, stats: dict[str, np.ndarray], timing):
    """Reads a finished call's metrics: checks the loss, writes the epochs' scalars, adds the
    call's steps to the phase's sums."""
    m = jax.tree.map(np.asarray, chunk.metrics)
    now = time.time()
    seconds = (chunk.seconds if chunk.seconds is not None
               else now - max(chunk.started, self.last_fetch))
    self.last_fetch = now
    timing["time/train_s"] += seconds
    if not np.all(np.isfinite(m["loss"])):
      bad = chunk.epoch + int(np.argmax(~np.isfinite(m["loss"])))
      raise FloatingPointError(
          f"non-finite loss in phase {phase}, epoch {bad} (lr "
          f"{_learning_rate(self.exp.config.optim, bad)}); the last good checkpoint in "
          f"{self.checkpointer.directory} is intact. Start over in a new --workdir with a lower "
          "config.optim.learning_rate (a workdir resumes only the config it was started with), or "
          "fix the input data and rerun to resume.")
    steps_per_epoch = int(m["steps"][0])
    last_step = int(stats["step"])
    for i, lr in enumerate(chunk.learning_rates):
      scalars = {f"train/{k}": float(v[i]) for k, v in m.items()
                 if k not in ("examples", "steps", "class_grad_norms")}
      scalars.update({"train/lr": lr, "train/images_per_s": float(m["examples"].sum()) / seconds})
      self.writer.write_scalars(last_step + (i + 1) * steps_per_epoch, scalars, phase=phase,
                                epoch=chunk.epoch + i)
      if self.on_epoch is not None:
        self.on_epoch({"phase": phase, "epoch": chunk.epoch + i,
                       "epochs": self.exp.config.optim.epochs,
                       "phases": self.exp.plan.num_phases, **scalars})
    stats = dict(stats, step=last_step + len(chunk.learning_rates) * steps_per_epoch,
                 steps=stats["steps"] + m["steps"].sum(),
                 class_grad_norms=stats["class_grad_norms"] + m["class_grad_norms"].sum(0))
    if "gr_beta_mean" in m:
      stats.update(gr_beta_sum=stats["gr_beta_sum"] + (m["gr_beta_mean"] * m["steps"]).sum(),
                   gr_beta_min=np.minimum(stats["gr_beta_min"], m["gr_beta_min"].min()),
                   gr_beta_max=np.maximum(stats["gr_beta_max"], m["gr_beta_max"].max()))
    return stats

  def _save(self, run: state_lib.RunState, number: int, timing) -> None:
    tic = time.time()
    self.checkpointer.save(number, run, self.elapsed())
    self.last_save = time.time()
    timing["time/checkpoint_s"] += self.last_save - tic

  def train_phase(self, run: state_lib.RunState, phase: int):
    """The epochs of ``phase`` not yet done, in compiled calls of ``config.epochs_per_call``."""
    exp = self.exp
    cfg = exp.config
    epochs, per_call = cfg.optim.epochs, cfg.epochs_per_call
    fns = exp.incremental_steps if phase else exp.base_steps
    tic = time.time()
    _log_phase_data(exp.plan, phase, cfg.memory.per_class)
    data, consts = phase_data(exp, run, phase), constants(exp, phase)
    # Where this phase's time goes, in this process (a resumed phase counts its epochs since).
    timing = {"time/phase_data_s": time.time() - tic, "time/train_s": 0.0,
              "time/checkpoint_s": 0.0}
    tic = time.time()
    exp.wait_compiled()  # none is still compiling once training starts
    timing["time/compile_wait_s"] = time.time() - tic
    teacher = (run.teacher_params, run.teacher_batch_stats)
    stats = dict(jax.tree.map(np.asarray, run.phase_stats), step=int(run.train.step))
    # Host values into the run state, replicated like the rest of it (a multi-host save needs that).
    to_state = lambda x: parallel.replicate(jax.tree.map(jnp.asarray, x), exp.mesh)
    sums = lambda stats: {k: v for k, v in stats.items() if k != "step"}
    epoch, pending = int(run.epoch), None
    while epoch < epochs:
      count = min(per_call - epoch % per_call, epochs - epoch)
      lrs = [_learning_rate(cfg.optim, e) for e in range(epoch, epoch + count)]
      keys = _epoch_keys(run.key, phase, epoch, count)  # replicated, as the root key
      started = time.time()
      # The rates placed as the programs compiled ahead of time expect them.
      train, metrics = fns.train_epochs(run.train, teacher, data, consts, keys,
                                        to_state(np.asarray(lrs, np.float32)))
      seconds = (time.time() - started
                 if all(x.is_ready() for x in jax.tree.leaves(metrics)) else None)
      run = run.replace(train=train)
      if pending is not None:  # finished: the call just dispatched depends on it
        stats = self._record(phase, pending, stats, timing)
      pending = _Chunk(epoch, lrs, metrics, started, seconds)
      epoch += count
      if epoch < epochs and (self.signals.received is not None or
                             time.time() - self.last_save >= cfg.checkpoint.every_seconds):
        stats, pending = self._record(phase, pending, stats, timing), None
        run = run.replace(epoch=to_state(np.int32(epoch)), phase_stats=to_state(sums(stats)))
        self._save(run, phase * (epochs + 1) + epoch, timing)
        if self.signals.received is not None:
          raise Stopped(self.signals.received, self.checkpointer.directory, phase, epoch - 1)
    if pending is not None:
      stats = self._record(phase, pending, stats, timing)
    run = run.replace(epoch=to_state(np.int32(epoch)), phase_stats=to_state(sums(stats)))
    return run, consts, timing

  def end_phase(self, run: state_lib.RunState, phase: int, consts, timing,
                compile_s: Callable[[], float]):
    """Memory, evaluation, the phase's diagnostics and scalars, the phase-end checkpoint."""
    exp = self.exp
    tic = time.time()
    head = jax.device_get(run.train.params["classifier"])
    gr_state = jax.device_get(optim.reweighting_state(run.train.opt_state))
    stats = jax.device_get(run.phase_stats)
    run = jax.block_until_ready(_finish_phase(exp, run, phase))
    timing["time/phase_end_s"] = time.time() - tic
    scalars = _phase_accuracy(exp, run, phase)
    if exp.config.diagnostics:
      record = diagnostics.phase_record(
          jax.device_get(consts), exp.plan.train_counts, head,
          np.asarray(run.correct_tag[phase]), exp.test.num_test, reweight_state=gr_state,
          kd_scale_stats=None if gr_state is None else diagnostics.KDScaleStats(
              stats["gr_beta_sum"] / max(stats["steps"], 1), stats["gr_beta_min"],
              stats["gr_beta_max"]),
          cumulative_grad_norms=stats["class_grad_norms"] if gr_state is None else None)
      self.diag = diagnostics.append(self.diag, phase, record)
      scalars.update(diagnostics.tensorboard_scalars(record))
      if jax.process_index() == 0:
        diagnostics.save(self.workdir, self.diag)
    # Compilation is part of the other entries (it runs inside the first calls of each program);
    # checkpoint_s counts the saves before this one, which Orbax writes in the background.
    self.writer.write_scalars(int(run.train.step),
                              {**scalars, **timing, "time/compile_s": compile_s()}, phase=phase)
    # Saved last: a run killed before this save redoes the phase end, and the writer and the
    # diagnostics drop what they hold past the checkpoint it resumes from.
    self._save(run, (phase + 1) * (exp.config.optim.epochs + 1), timing)
    for key, seconds in timing.items():
      name = key.removeprefix("time/").removesuffix("_s")
      self.time_split[name] = self.time_split.get(name, 0.0) + seconds
    return run


def _results(exp: Experiment, run: state_lib.RunState, config, wall_time_s: float):
  plan = exp.plan
  results = metrics.summarize(np.asarray(run.correct_tag), np.asarray(run.correct_taw),
                              exp.test.num_test, plan.task_sizes, plan.train_counts)
  results.update(
      seeds=[int(config.seed)], task_sizes=list(plan.task_sizes),
      class_order=[int(c) for c in plan.class_order],
      train_counts=[int(c) for c in plan.train_counts], config=config.to_dict(),
      wall_time_s=wall_time_s, devices=[str(d) for d in exp.mesh.devices.flat],
      provenance=provenance.provenance(exp.mesh.devices.flat))
  return results


def run_seed(exp: Experiment, config: ml_collections.ConfigDict, workdir: str,
             on_epoch: Optional[EpochHook] = None) -> dict[str, Any]:
  """Runs (or resumes) the protocol for ``config.seed`` in ``workdir``; returns its results.

  Raises:
    Stopped: on SIGTERM / SIGINT, after saving a checkpoint.
    FloatingPointError: on a non-finite loss; the last good checkpoint stays.
  """
  os.makedirs(workdir, exist_ok=True)
  checkpointer = ckpt.Checkpointer(workdir, config.to_dict(), exp.data_digest,
                                   keep=config.checkpoint.keep)
  run = parallel.replicate(exp.init_run(jax.random.key(config.seed)), exp.mesh)
  restored = checkpointer.restore(ckpt.abstract_like(run))
  wall_offset = 0.0
  if restored is not None:
    run, wall_offset = restored
    logging.info("resumed from %s at phase %d (of 0-%d), epoch %d", checkpointer.directory,
                 int(run.phase), exp.plan.num_phases - 1, int(run.epoch))
  lead = jax.process_index() == 0  # one process writes the run's files
  if lead:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2, default=str)
  started = time.time()
  elapsed = lambda: wall_offset + time.time() - started
  try:
    with (report.MetricWriter(workdir, resume_step=int(run.train.step)) if lead
          else report.NullWriter()) as writer, _Signals() as signals, _CompileClock() as clock:
      loop = _SeedLoop(exp, workdir, checkpointer, writer, elapsed, on_epoch, signals,
                       diag=diagnostics.load(workdir) if config.diagnostics else None)
      while int(run.phase) < exp.plan.num_phases:
        phase = int(run.phase)
        compiled_before = clock.seconds
        run, consts, timing = loop.train_phase(run, phase)
        run = loop.end_phase(run, phase, consts, timing,
                             compile_s=lambda: clock.seconds - compiled_before)
        if signals.received is not None and phase + 1 < exp.plan.num_phases:  # saved just now
          raise Stopped(signals.received, checkpointer.directory, phase, config.optim.epochs - 1)
  finally:
    checkpointer.close()
  results = _results(exp, run, config, elapsed())
  # Seconds in this process (a resumed run counts since it resumed): compilation inside the loop,
  # each program compiled ahead of time (before training) and where the time went.
  results.update(compile_s=clock.seconds, build_s=exp.build_s,
                 compile_ahead_s=exp.wait_compiled(),
                 time_split_s=dict(loop.time_split,
                                   other=time.time() - started - sum(loop.time_split.values())))
  if lead:
    report.write_results(workdir, results)
    report.plot_results(workdir, results, list(exp.plan.train_counts))
    if loop.diag is not None:
      diagnostics.plot_diagnostics(workdir, loop.diag)
  return results


def run(config: ml_collections.ConfigDict, workdir: str,
        on_epoch: Optional[EpochHook] = None) -> dict[str, Any]:
  """Runs (or resumes) the whole protocol for every seed; returns what ``results.json`` holds.

  One seed trains in ``workdir``; several (``config.seeds``) train in turn, each in
  ``workdir/seed_<s>`` as its own single-seed run, and ``workdir/results.json`` pools them.
  """
  parallel.initialize_distributed()
  if jax.process_index() == 0:  # one check: it creates and removes a probe file (and the folder)
    report.check_workdir(workdir)
  exp = build_experiment(config)  # validates the config and loads the data before any file is made
  seeds = config_lib.seeds(config)
  if config.seeds is None:
    return run_seed(exp, config, workdir, on_epoch)
  per_seed = [run_seed(exp, config_lib.for_seed(config, s), os.path.join(workdir, f"seed_{s}"),
                       on_epoch) for s in seeds]
  results = report.combine_seed_results(per_seed)
  results["config"] = config.to_dict()
  if jax.process_index() == 0:
    report.write_results(workdir, results)
    report.plot_results(workdir, results, results["train_counts"])
  return results
