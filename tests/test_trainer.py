"""The trainer end to end on a synthetic dataset: outputs, resume, seeds, compilation, errors."""

import json
import logging as py_logging
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compile_events
import gr_jax
from gr_jax import checkpoint as ckpt
from gr_jax import diagnostics
from gr_jax import trainer
from tiny_run import tiny_config

FLOAT32_EPS = float(np.finfo(np.float32).eps)


class _Records(py_logging.Handler):
  """Keeps the log records gr_jax emits (through absl's logger) while attached."""

  def __init__(self):
    super().__init__(py_logging.INFO)
    self.records = []

  def emit(self, record):
    self.records.append(record)


@pytest.fixture(scope="module")
def uninterrupted(synthetic_npz, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  handler, logger = _Records(), py_logging.getLogger("absl")
  level = logger.level
  logger.addHandler(handler)
  logger.setLevel(py_logging.INFO)
  try:
    results = trainer.run(tiny_config(synthetic_npz), str(workdir))
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
  return workdir, results, handler.records


def test_run_writes_every_output(uninterrupted):
  workdir, results, _ = uninterrupted
  for name in ("results.json", "metrics.jsonl", "accuracy.png", "config.json"):
    assert (workdir / name).stat().st_size > 0, name
  assert list((workdir / "tensorboard").iterdir())
  saved = json.loads((workdir / "results.json").read_text())
  for key in ("acc_tag", "acc_taw", "avg_acc_per_phase", "avg_acc_per_phase_weighted",
              "average_incremental_accuracy", "last_accuracy", "forgetting",
              "per_class_accuracy", "config", "wall_time_s", "provenance"):
    assert key in saved, key
  assert saved["provenance"]["packages"]["jax"] == jax.__version__
  phases = len(saved["task_sizes"])
  assert np.asarray(saved["acc_tag"], dtype=float).shape == (phases, phases)
  assert saved["average_incremental_accuracy"] == pytest.approx(
      np.mean(saved["avg_acc_per_phase"]))
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [l for l in lines if "train/loss" in l]
  assert len(train) == phases * 2
  assert all(np.isfinite(l["train/loss"]) and l["train/images_per_s"] > 0 for l in train)
  # Phases >= 1 distil: their KD loss is positive, the base phase has none.
  assert all(l["train/loss_kd"] == 0 for l in train if l["phase"] == 0)
  assert all(l["train/loss_kd"] > 0 for l in train if l["phase"] > 0)
  # One line per phase end: A_t as papers report it (mean over the tasks seen), the accuracy over
  # all seen test images, and where the phase's time went.
  ends = [l for l in lines if "eval/acc_tag" in l]
  assert [l["phase"] for l in ends] == list(range(phases))
  np.testing.assert_allclose([l["eval/acc_tag"] for l in ends], saved["avg_acc_per_phase"],
                             rtol=1e-12)
  np.testing.assert_allclose([l["eval/acc_tag_weighted"] for l in ends],
                             saved["avg_acc_per_phase_weighted"], rtol=1e-12)
  for l in ends:
    timing = [l[f"time/{k}_s"] for k in ("phase_data", "train", "phase_end", "checkpoint")]
    assert all(t >= 0 for t in timing) and l["time/train_s"] > 0, l
  # results.json sums them over the phases (its checkpoints also count each phase-end save, which
  # follows the phase's line); with the rest they make up the run's wall time.
  split = saved["time_split_s"]
  for k in ("phase_data", "train", "phase_end"):
    assert split[k] == pytest.approx(sum(l[f"time/{k}_s"] for l in ends)), k
  assert split["checkpoint"] >= sum(l["time/checkpoint_s"] for l in ends)
  assert sum(split.values()) == pytest.approx(saved["wall_time_s"], rel=0.05, abs=0.5)
  assert saved["compile_ahead_s"] == [] and saved["build_s"] > 0  # host-loop epochs: none ahead
  assert (workdir / "checkpoints").is_dir()


def test_kill_and_resume_is_bit_identical_also_after_the_data_moved(synthetic_npz, tmp_path,
                                                                    uninterrupted):
  _, reference, _ = uninterrupted
  moved = tmp_path / "elsewhere" / "synthetic.npz"  # the same file at another path
  moved.parent.mkdir()
  moved.symlink_to(synthetic_npz)

  class Killed(Exception):
    pass

  def kill(m):
    if m["phase"] == 1 and m["epoch"] == 0:
      raise Killed()

  with pytest.raises(Killed):
    trainer.run(tiny_config(synthetic_npz), str(tmp_path), on_epoch=kill)
  resumed = trainer.run(tiny_config(moved), str(tmp_path))
  for key in ("acc_tag", "acc_taw", "per_class_accuracy", "average_incremental_accuracy"):
    np.testing.assert_array_equal(np.asarray(resumed[key], dtype=float),
                                  np.asarray(reference[key], dtype=float), err_msg=key)
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  full = [json.loads(l) for l in (uninterrupted[0] / "metrics.jsonl").read_text().splitlines()]
  # The killed run's record of phase 1 epoch 0 (after its last checkpoint) was dropped and
  # written again: the log equals the uninterrupted run's, each epoch once.
  train = lambda ls: [(l["phase"], l["epoch"], l["step"], l["train/loss"]) for l in ls
                      if "train/loss" in l]
  assert train(lines) == train(full)


def test_workdir_of_another_config_is_refused(synthetic_npz, uninterrupted):
  workdir, _, _ = uninterrupted
  before = sorted(os.listdir(workdir / "checkpoints"))
  other = tiny_config(synthetic_npz, **{"optim.learning_rate": 0.05})
  with pytest.raises(ValueError, match=r"different run \(differing: optim.learning_rate \S+, "
                     r"now 0.05\).*rerun with the saved run's settings"):
    trainer.run(other, str(workdir))
  # Only what differs is named (the saved config's lists equal the live config's tuples).
  with pytest.raises(ValueError, match=r"different run \(differing: seed \d+, now 7\)"):
    trainer.run(tiny_config(synthetic_npz, seed=7), str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == before


def test_seeds_run_in_turn_compile_once_and_equal_their_single_seed_runs(
    synthetic_npz, tmp_path, uninterrupted, monkeypatch):
  """``--config.seeds=0,1``: each seed runs as its single-seed run (seed 0: the module's run), the
  second seed lowers no program, and the results pool."""
  lowered = []
  run_seed = trainer.run_seed

  def counted_run_seed(*args, **kwargs):
    with compile_events.Lowerings() as counter:
      result = run_seed(*args, **kwargs)
    lowered.append(counter.names)
    return result

  monkeypatch.setattr(trainer, "run_seed", counted_run_seed)
  pooled = trainer.run(tiny_config(synthetic_npz, seeds="0,1"), str(tmp_path / "both"))
  monkeypatch.undo()
  assert len(lowered) == 2 and lowered[0] and not lowered[1], f"programs lowered: {lowered}"
  # The epoch program (a looped epoch's step, or the scanned epochs), once per step kind (base,
  # incremental): a step's carry keeps its types from the first step on.
  epochs = [name for name in lowered[0] if name in ("jit(_epoch_step)", "jit(train_epochs)")]
  assert len(epochs) == 2, lowered[0]

  alone = [uninterrupted[1],
           trainer.run(tiny_config(synthetic_npz, seed=1), str(tmp_path / "seed_1_alone"))]
  for key in ("acc_tag", "acc_taw", "per_class_accuracy", "average_incremental_accuracy"):
    for seed in (0, 1):
      np.testing.assert_array_equal(np.asarray(pooled["per_seed"][seed][key], dtype=float),
                                    np.asarray(alone[seed][key], dtype=float), err_msg=key)
  for seed in (0, 1):
    assert (tmp_path / "both" / f"seed_{seed}" / "results.json").exists()
  values = [r["average_incremental_accuracy"] for r in pooled["per_seed"]]
  assert pooled["seeds"] == [0, 1]
  assert pooled["average_incremental_accuracy"] == pytest.approx(np.mean(values))
  assert pooled["average_incremental_accuracy_std"] == pytest.approx(np.std(values))
  saved = json.loads((tmp_path / "both" / "results.json").read_text())
  assert saved["seeds"] == [0, 1] and saved["config"]["seeds"] == "0,1"
  assert (tmp_path / "both" / "accuracy.png").stat().st_size > 0


def test_scanned_epoch_programs_compile_ahead_while_the_test_set_loads(synthetic_npz, tmp_path):
  """Epochs as ``lax.scan`` (the GPU default): ``build_experiment`` starts compiling both epoch
  programs for calls of ``epochs_per_call`` epochs, and the loop waits for them and compiles no
  epoch program itself: its jitted ``train_epochs`` finds them compiled (same shapes, dtypes and
  shardings). A resumed phase's shorter first call would compile on first use."""
  config = tiny_config(synthetic_npz, epoch_as_scan="true", epochs_per_call=2)
  exp = trainer.build_experiment(config)
  assert set(exp.compiling) == {(False, 2), (True, 2)}
  exp.wait_compiled()
  with compile_events.Compilations() as counter:
    results = trainer.run_seed(exp, config, str(tmp_path))
  assert not [name for name in counter.names if "train_epochs" in name], counter.names
  assert len(results["compile_ahead_s"]) == 2 and min(results["compile_ahead_s"]) > 0
  assert results["time_split_s"]["compile_wait"] >= 0


def _global_norm(a, b=None) -> float:
  diff = a if b is None else jax.tree.map(lambda x, y: np.asarray(x, np.float64) - y, a, b)
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                           for x in jax.tree.leaves(diff))))


def test_disabled_reweighting_equals_plain_sgd(synthetic_npz):
  """Base phase, no GR / prior: an epoch of the trainer equals a hand-written optax SGD loop."""
  config = tiny_config(synthetic_npz, **{"method.reweighting": "none", "method.kd": "none",
                                         "method.logit_prior": False, "optim.clip_norm": None})
  exp = trainer.build_experiment(config)
  run = exp.init_run(jax.random.key(0))
  data, consts = trainer.phase_data(exp, run, 0), trainer.constants(exp, 0)
  key = jax.random.key(7)
  start = jax.tree.map(np.asarray, run.train.params)
  trained, _ = exp.base_steps.train_epochs(
      jax.tree.map(jnp.copy, run.train), None, data, consts, key[None],
      jnp.full((1,), 0.1, jnp.float32))

  from gr_jax.data import augment  # pylint: disable=g-import-not-at-top
  train_aug, _ = augment.get_augmentation("cifar", 32)
  model, batch = exp.model, config.optim.batch_size
  tx = optax.chain(optax.add_decayed_weights(config.optim.weight_decay),
                   optax.sgd(0.1, momentum=config.optim.momentum))
  size = int(data.size)
  seen = np.asarray(consts.new_classes)
  order_key, aug_key = jax.random.split(key)
  capacity = data.labels.shape[0]
  u = jax.random.uniform(order_key, (capacity,))
  order = np.asarray(jnp.argsort(jnp.where(jnp.arange(capacity) < size, u, 2.0)))

  @jax.jit
  def sgd_step(p, bs, opt, x, y, mask, i, rows):
    # ``rows`` reorders the batch after augmentation: the same sums in another order.
    x, y, mask = train_aug(jax.random.fold_in(aug_key, i), x)[rows], y[rows], mask[rows]

    def loss_fn(p):
      (_, logits), new = model.apply({"params": p, "batch_stats": bs}, x, train=True, mask=mask,
                                     mutable=["batch_stats"])
      logits = jnp.where(seen, logits, -1e30)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return jnp.sum(ce * mask) / jnp.sum(mask), new["batch_stats"]

    grads, bs = jax.grad(loss_fn, has_aux=True)(p)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), bs, opt

  def loop(rows):
    p, bs = run.train.params, run.train.batch_stats
    opt = tx.init(p)
    for i in range(-(-size // batch)):
      idx = order[i * batch:(i + 1) * batch]
      mask = i * batch + np.arange(batch) < size
      p, bs, opt = sgd_step(p, bs, opt, data.images[idx], data.labels[idx], mask, i, rows)
    return jax.tree.map(np.asarray, p)

  reference = loop(np.arange(batch))
  reordered = loop(np.random.default_rng(0).permutation(batch))
  # Tolerance from float32 reassociation over the compared steps, measured here: the trainer
  # computes the same sums as the loop in another order (backward pass split at the features,
  # other XLA fusions), as the loop does with its batch rows reordered. Allow ten times the
  # reordering's effect (one rounding unit of the update at least), which is still far below the
  # effect of any real difference (checked: under 1 % of the epoch's whole update).
  update = _global_norm(reference, start)
  tolerance = 10 * max(_global_norm(reordered, reference), FLOAT32_EPS * update)
  assert tolerance < 1e-2 * update
  assert _global_norm(trained.params, reference) <= tolerance


def test_each_phase_logs_how_many_old_classes_are_kept_whole(synthetic_npz, uninterrupted):
  """With M = 7, the long tail's smallest classes hold fewer than 7 images: the memory keeps them
  whole, and each phase's log record counts them (full replay is expected, not an error)."""
  *_, records = uninterrupted
  plan = trainer.build_experiment(tiny_config(synthetic_npz)).plan
  kept_whole = [int(np.sum(plan.train_counts[:plan.class_range(t)[0]] < 7))
                for t in range(1, plan.num_phases)]
  logged = [r.args[-1] for r in records if r.args and "kept whole" in r.msg]
  assert logged == kept_whole and kept_whole[-1] > 0  # the case is really exercised


def test_non_finite_loss_stops_with_clear_error_and_keeps_checkpoint(synthetic_npz, tmp_path):
  """Epoch 0 trains normally (checkpointed); the lr then explodes and the loss becomes non-finite."""
  config = tiny_config(synthetic_npz, **{"optim.milestones": (1,), "optim.lr_decay": 1e30})
  with pytest.raises(FloatingPointError, match="non-finite loss in phase 0, epoch 1") as err:
    trainer.run(config, str(tmp_path))
  assert "checkpoint" in str(err.value)
  exp = trainer.build_experiment(config)
  checkpointer = ckpt.Checkpointer(str(tmp_path), config.to_dict(), exp.data_digest)
  assert checkpointer.latest_step() == 1  # after epoch 0 of phase 0
  run, _ = checkpointer.restore(ckpt.abstract_like(exp.init_run(jax.random.key(0))))
  checkpointer.close()
  assert int(run.epoch) == 1 and int(run.phase) == 0
  assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(run.train.params))


def test_sigterm_saves_and_stops_then_the_run_resumes_bit_identical(synthetic_npz, tmp_path,
                                                                    uninterrupted):
  """SIGTERM (a preemption) mid-phase: the run saves after the call in flight and stops cleanly;
  the same command then finishes it exactly as an uninterrupted run."""
  _, reference, _ = uninterrupted
  config = tiny_config(synthetic_npz, **{"checkpoint.every_seconds": 1e9})  # no timed saves

  def preempt(m):
    if m["phase"] == 1 and m["epoch"] == 0:
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(trainer.Stopped, match=r"stopped by SIGTERM in phase 1 after epoch 1; "
                     r"checkpoint saved in .*rerun the same command to resume"):
    trainer.run(config, str(tmp_path), on_epoch=preempt)
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone again
  resumed = trainer.run(config, str(tmp_path))
  for key in ("acc_tag", "acc_taw", "per_class_accuracy", "average_incremental_accuracy"):
    np.testing.assert_array_equal(np.asarray(resumed[key], dtype=float),
                                  np.asarray(reference[key], dtype=float), err_msg=key)


def test_diagnostics_record_what_the_run_holds(synthetic_npz, uninterrupted, tmp_path):
  workdir, results, _ = uninterrupted
  config = tiny_config(synthetic_npz)
  exp = trainer.build_experiment(config)
  diag = diagnostics.load(workdir)
  assert (workdir / "diagnostics.png").stat().st_size > 0
  phases = exp.plan.num_phases
  assert diag["phase"].tolist() == list(range(phases))
  for phase in range(phases):  # π and R_c: the phase constants
    consts = jax.device_get(trainer.constants(exp, phase))
    np.testing.assert_array_equal(diag["prior_counts"][phase], consts.class_counts)
    np.testing.assert_array_equal(diag["lost_counts"][phase], consts.lost_counts)
  # The last phase's record against the final checkpoint (its optimiser state is that phase's).
  checkpointer = ckpt.Checkpointer(str(workdir), config.to_dict(), exp.data_digest)
  run, _ = checkpointer.restore(ckpt.abstract_like(exp.init_run(jax.random.key(0))))
  checkpointer.close()
  gr = gr_jax.optim.reweighting_state(run.train.opt_state)
  np.testing.assert_array_equal(diag["cumulative_norms"][-1], gr.cumulative_norms)
  np.testing.assert_array_equal(diag["cumulative_kd_norms"][-1], gr.cumulative_kd_norms)
  np.testing.assert_array_equal(diag["class_scale"][-1], gr.class_scale)
  assert diag["beta_last"][-1] == gr.kd_scale
  assert diag["beta_min"][-1] <= diag["beta_mean"][-1] <= diag["beta_max"][-1]
  kernel = np.asarray(run.train.params["classifier"]["kernel"], np.float64)
  np.testing.assert_allclose(diag["weight_norm"][-1], np.linalg.norm(kernel, axis=0), rtol=1e-12)
  np.testing.assert_allclose(diag["accuracy"][-1], results["per_class_accuracy"], rtol=1e-12)
  # Recording changes no result: the same run without it, to the last bit.
  plain = trainer.run(tiny_config(synthetic_npz, diagnostics=False), str(tmp_path))
  assert not (tmp_path / "diagnostics.npz").exists()
  for key in ("acc_tag", "acc_taw", "per_class_accuracy"):
    np.testing.assert_array_equal(np.asarray(plain[key], dtype=float),
                                  np.asarray(results[key], dtype=float), err_msg=key)
