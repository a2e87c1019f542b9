"""The trainer end to end on real CIFAR-100: outputs, resume, compilation count, errors, baselines."""

import json
import logging as py_logging
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gr_jax import trainer
from tiny_run import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def uninterrupted(cifar100_npz, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  config = tiny_config(cifar100_npz)
  exp_results = trainer.run(config, str(workdir))
  return workdir, exp_results


def test_run_writes_every_output(uninterrupted):
  workdir, results = uninterrupted
  for name in ("results.json", "metrics.jsonl", "accuracy.png", "config.json"):
    assert (workdir / name).stat().st_size > 0, name
  assert list((workdir / "tensorboard").iterdir())
  saved = json.loads((workdir / "results.json").read_text())
  for key in ("acc_tag", "acc_taw", "avg_acc_per_phase", "avg_acc_per_phase_weighted",
              "average_incremental_accuracy", "last_accuracy", "forgetting",
              "per_class_accuracy", "config", "wall_time_s", "provenance"):
    assert key in saved, key
  assert saved["provenance"]["packages"]["jax"] == jax.__version__
  assert saved["provenance"]["device_kinds"] == sorted({d.device_kind for d in jax.devices()[:1]})
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
  # One line per phase end: its accuracy and where the phase's time went.
  ends = [l for l in lines if "eval/acc_tag_weighted" in l]
  assert [l["phase"] for l in ends] == list(range(phases))
  for l in ends:
    timing = [l[f"time/{k}_s"] for k in ("phase_data", "train", "phase_end", "checkpoint")]
    assert all(t >= 0 for t in timing) and l["time/train_s"] > 0, l
  assert (workdir / "checkpoints").is_dir()


def test_kill_and_resume_is_bit_identical_also_after_the_data_moved(cifar100_npz, tmp_path,
                                                                    uninterrupted):
  _, reference = uninterrupted
  config = tiny_config(cifar100_npz)
  moved = tmp_path / "elsewhere" / "cifar100.npz"  # the same file at another path
  moved.parent.mkdir()
  moved.symlink_to(cifar100_npz)

  class Killed(Exception):
    pass

  def kill(m):
    if m["phase"] == 1 and m["epoch"] == 0:
      raise Killed()

  with pytest.raises(Killed):
    trainer.run(config, str(tmp_path), on_epoch=kill)
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


def test_workdir_of_another_config_is_refused(cifar100_npz, uninterrupted):
  workdir, _ = uninterrupted
  before = sorted(os.listdir(workdir / "checkpoints"))
  other = tiny_config(cifar100_npz, **{"optim.learning_rate": 0.05})
  with pytest.raises(ValueError, match=r"different run \(differing: optim.learning_rate \S+, "
                     r"now 0.05\).*rerun with the saved run's settings"):
    trainer.run(other, str(workdir))
  # Only what differs is named (the saved config's lists equal the live config's tuples).
  with pytest.raises(ValueError, match=r"different run \(differing: seed \d+, now 7\)"):
    trainer.run(tiny_config(cifar100_npz, seed=7), str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == before


@pytest.mark.parametrize("epoch_as_scan", ["false", "true"])
def test_one_compilation_per_step_kind(cifar100_npz, epoch_as_scan):
  exp = trainer.build_experiment(tiny_config(cifar100_npz, epoch_as_scan=epoch_as_scan))
  state = trainer.init_state(exp)
  for phase in range(exp.plan.num_phases):
    fns = exp.incremental_steps if phase else exp.base_steps
    data = trainer._phase_data(exp, state, phase)  # pylint: disable=protected-access
    consts = trainer._constants(exp, phase)  # pylint: disable=protected-access
    carry = (state.params, state.batch_stats, state.opt_state, state.step)
    keys = jax.random.split(jax.random.key(phase), 1)[:, None]
    for _ in range(2):  # a second call must reuse the compiled program (same shardings)
      carry, _ = fns.train_epochs(carry, (state.teacher_params, state.teacher_batch_stats), data,
                                  consts, keys, jnp.full((1,), 0.1, jnp.float32))
    state = state.replace(params=carry[0], batch_stats=carry[1], opt_state=carry[2],
                          step=carry[3], epoch=state.epoch + exp.config.optim.epochs)
    state = trainer._finish_phase(exp, state, phase)  # pylint: disable=protected-access
  for fns in (exp.base_steps, exp.incremental_steps):
    for compiled in fns.compiled:
      assert compiled._cache_size() == 1  # pylint: disable=protected-access


def test_disabled_reweighting_equals_plain_sgd(cifar100_npz):
  """Base phase, no GR / prior: the epoch equals a hand-written optax SGD loop on the same batches."""
  config = tiny_config(cifar100_npz, **{"method.reweighting": "none", "method.kd": "none",
                                        "method.logit_prior": False, "optim.clip_norm": 0.0})
  exp = trainer.build_experiment(config)
  state = trainer.init_state(exp)
  data = trainer._phase_data(exp, state, 0)  # pylint: disable=protected-access
  consts = trainer._constants(exp, 0)  # pylint: disable=protected-access
  keys = jax.random.split(jax.random.key(7), 1)
  key = keys[0]
  carry = (state.params, state.batch_stats, state.opt_state, state.step)
  (params, _, _, _), _ = exp.base_steps.train_epochs(
      jax.tree.map(jnp.copy, carry), (state.teacher_params, state.teacher_batch_stats), data,
      consts, keys[:, None], jnp.full((1,), 0.1, jnp.float32))

  from gr_jax.data import augment  # pylint: disable=g-import-not-at-top
  train_aug, _ = augment.get_augmentation("cifar", 32)
  model, batch = exp.model, config.optim.batch_size
  tx = optax.chain(optax.add_decayed_weights(config.optim.weight_decay),
                   optax.sgd(0.1, momentum=config.optim.momentum))
  p = jax.tree.map(lambda a: a[0], state.params)
  bs = jax.tree.map(lambda a: a[0], state.batch_stats)
  opt = tx.init(p)
  size = int(data.size)
  seen = np.asarray(consts.new_classes)
  order_key, aug_key = jax.random.split(key)
  capacity = data.labels.shape[1]
  u = jax.random.uniform(order_key, (capacity,))
  order = np.asarray(jnp.argsort(jnp.where(jnp.arange(capacity) < size, u, 2.0)))

  @jax.jit
  def sgd_step(p, bs, opt, x, y, mask, i):
    x = train_aug(jax.random.fold_in(aug_key, i), x)

    def loss_fn(p):
      (_, logits), new = model.apply({"params": p, "batch_stats": bs}, x, train=True, mask=mask,
                                     mutable=["batch_stats"])
      logits = jnp.where(seen, logits, -1e30)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return jnp.sum(ce * mask) / jnp.sum(mask), new["batch_stats"]

    grads, bs = jax.grad(loss_fn, has_aux=True)(p)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), bs, opt

  for i in range(-(-size // batch)):
    idx = order[i * batch:(i + 1) * batch]
    mask = i * batch + np.arange(batch) < size
    p, bs, opt = sgd_step(p, bs, opt, data.images[0][idx], data.labels[0][idx], mask, i)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(p)):
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want), rtol=2e-4, atol=2e-5)


def test_each_phase_logs_how_many_old_classes_are_kept_whole(cifar100_npz, caplog):
  """CIFAR-100-LT (LFS 20 × 5) with M = 20: the tail classes hold fewer than 20 training images, so
  the memory keeps them whole; each phase's line says how many of its old classes that is."""
  from gr_jax.data import protocol  # pylint: disable=g-import-not-at-top
  with np.load(cifar100_npz) as archive:
    y_train, y_test = archive["y_train"], archive["y_test"]
  plan = protocol.make_plan(y_train, y_test, dataset_name="cifar100", scenario="shuffled",
                            profile="exponential", rho=0.01, nc_first_task=None, num_tasks=5,
                            val_fraction=0.1, seed=1993)
  with caplog.at_level(py_logging.INFO, logger="absl"):
    for phase in range(plan.num_phases):
      trainer._log_phase_data(plan, phase, 20)  # pylint: disable=protected-access
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 5
  assert lines[0] == (f"phase 0 (of 0-4): {len(plan.train_idx[0])} images of 20 new classes, "
                      "no memory yet")
  for phase, line in enumerate(lines[1:], start=1):
    old = plan.train_counts[:20 * phase]
    whole = int((old < 20).sum())
    assert line == (f"phase {phase} (of 0-4): {len(plan.train_idx[phase])} images of 20 new "
                    f"classes + memory of {20 * phase} old classes: "
                    f"{int(np.minimum(old, 20).sum())} images, at most 20 per class; classes "
                    f"kept whole (fewer than 20 training images): {whole}")
  assert int((plan.train_counts[:80] < 20).sum()) > 0  # the case is really exercised


def test_non_finite_loss_stops_with_clear_error_and_keeps_checkpoint(cifar100_npz, tmp_path):
  """Epoch 0 trains normally (checkpointed); the lr then explodes and the loss becomes non-finite."""
  config = tiny_config(cifar100_npz, **{"optim.milestones": (1,), "optim.lr_decay": 1e30})
  with pytest.raises(FloatingPointError, match="non-finite loss in phase 0, epoch 1") as err:
    trainer.run(config, str(tmp_path))
  assert "checkpoint" in str(err.value)
  from gr_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  from gr_jax.data import sources  # pylint: disable=g-import-not-at-top
  exp = trainer.build_experiment(config)
  checkpointer = ckpt.Checkpointer(str(tmp_path), config.to_dict(),
                                   data_digest=sources.dataset_digest(exp.dataset))
  assert checkpointer.latest_step() == 1  # after epoch 0 of phase 0
  state, _ = checkpointer.restore(ckpt.abstract_like(trainer.init_state(exp)))
  checkpointer.close()
  assert int(state.epoch[0]) == 1 and int(state.phase[0]) == 0
  assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(state.params))


def test_seeds_train_together_and_report_mean_and_std(cifar100_npz, tmp_path):
  config = tiny_config(cifar100_npz, seeds="0,1", **{"protocol.num_tasks": 2,
                                                     "protocol.num_classes": 8})
  results = trainer.run(config, str(tmp_path))
  per_seed = results["per_seed"]
  assert results["seeds"] == [0, 1] and len(per_seed) == 2
  values = [r["average_incremental_accuracy"] for r in per_seed]
  # Independent seeds: different initial weights (and data orders / augmentations).
  state = trainer.init_state(trainer.build_experiment(config))
  kernel = np.asarray(state.params["classifier"]["kernel"])
  assert kernel.shape[0] == 2 and not np.allclose(kernel[0], kernel[1])
  assert results["average_incremental_accuracy"] == pytest.approx(np.mean(values))
  assert results["average_incremental_accuracy_std"] == pytest.approx(np.std(values))
  matrices = np.asarray([np.asarray(r["acc_tag"], dtype=float) for r in per_seed])
  np.testing.assert_allclose(np.asarray(results["acc_tag"], dtype=float),
                             np.where(np.isnan(matrices[0]), np.nan, matrices.mean(axis=0)))
  # On the CPU the seeds of one program are unrolled (no loop), each the single-seed program: seed
  # 1 trained alone gets the same accuracies to the last bit.
  alone = trainer.run(tiny_config(cifar100_npz, seed=1, **{"protocol.num_tasks": 2,
                                                           "protocol.num_classes": 8}),
                      str(tmp_path / "seed1_alone"))
  np.testing.assert_array_equal(np.asarray(alone["acc_tag"], dtype=float), matrices[1])
  _check_combine_seeds(tmp_path, json.loads((tmp_path / "results.json").read_text()))


def _check_combine_seeds(tmp_path, together):
  """launch/combine_seeds.py pools the two seeds, written as separate single-seed runs, into the
  two-seed run's summary; it refuses runs that share a seed or differ in config."""
  paths = []
  for seed, own in zip(together["seeds"], together["per_seed"]):
    run = dict(own, seeds=[seed], config=dict(together["config"], seed=seed, seeds=""),
               task_sizes=together["task_sizes"], class_order=together["class_order"],
               train_counts=together["train_counts"], wall_time_s=1.5)
    paths.append(tmp_path / f"seed{seed}.json")
    paths[-1].write_text(json.dumps(run))
  other = json.loads(paths[1].read_text())
  other["seeds"], other["config"]["optim"] = [2], dict(other["config"]["optim"], learning_rate=0.05)
  (tmp_path / "other.json").write_text(json.dumps(other))
  combine = lambda *files: subprocess.run(
      [sys.executable, str(REPO / "launch" / "combine_seeds.py"), f"--out={tmp_path / 'out.json'}",
       *map(str, files)], capture_output=True, text=True)
  done = combine(*paths)
  assert done.returncode == 0 and "2 seeds [0, 1]" in done.stdout, done.stderr
  pooled = json.loads((tmp_path / "out.json").read_text())
  for key in ("average_incremental_accuracy", "average_incremental_accuracy_std", "last_accuracy",
              "last_accuracy_std", "per_seed", "acc_tag", "shot_accuracy", "seeds"):
    assert pooled[key] == together[key], key
  assert pooled["wall_time_s"] == 3.0
  repeated = combine(paths[0], paths[0])
  assert repeated.returncode != 0 and "seeds repeat" in repeated.stderr
  differs = combine(paths[0], tmp_path / "other.json")
  assert differs.returncode != 0 and "optim" in differs.stderr


def test_seed_executions_agree_with_single_seed_programs(cifar100_npz):
  """One step of seeds 0,1 in one program (sequential and vmapped) equals seed 0 and seed 1 each
  trained alone, leaf by leaf, through the scanned epoch (the GPU path; the CPU loop path runs two
  sequential seeds in test_seeds_train_together_and_report_mean_and_std). One step: over many steps
  of this tiny run float32 rounding differences between programs grow ~50x a step, see
  tests/parallel_check.py."""
  small = {"protocol.num_tasks": 2, "protocol.num_classes": 8, "epoch_as_scan": "true",
           "protocol.max_train_per_class": 4}  # 4 base classes x <= 4 images: one batch

  def one_epoch(**overrides):
    exp = trainer.build_experiment(tiny_config(cifar100_npz, **small, **overrides))
    state = trainer.init_state(exp)
    carry, metrics = exp.base_steps.train_epochs(
        (state.params, state.batch_stats, state.opt_state, state.step), None,
        trainer._phase_data(exp, state, 0), trainer._constants(exp, 0),  # pylint: disable=protected-access
        trainer._epoch_keys(state.key, 0, 0, 1), jnp.full((1,), 0.1, jnp.float32))  # pylint: disable=protected-access
    return jax.tree.map(np.asarray, (carry, metrics))

  alone = [one_epoch(seed=s) for s in (0, 1)]
  assert [int(a[0][3][0]) for a in alone] == [1, 1]  # one step each
  expected = jax.tree.map(lambda a, b: np.concatenate([a, b]), *alone)
  for mode in ("sequential", "vmap"):
    got = one_epoch(seeds="0,1", seed_execution=mode)
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5), got, expected)
  # The seeds really differ (so agreeing with each one alone is not trivial).
  kernel = expected[0][0]["classifier"]["kernel"]
  assert np.linalg.norm(kernel[0] - kernel[1]) > 0.1 * np.linalg.norm(kernel[0])
