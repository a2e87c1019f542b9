"""gr_jax.diagnostics: records equal what the transform, the constants and the params hold; files
round-trip; per-class forgetting agrees with gr_jax.metrics; the figures are written."""

import importlib.util
import os
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import gr_jax
from gr_jax import diagnostics
from gr_jax import losses
from gr_jax import metrics
from processes import run_side_by_side

REPO = pathlib.Path(__file__).resolve().parents[1]
TASK_SIZES = (3, 3, 3)
TRAIN_COUNTS = np.array([500, 200, 120, 80, 50, 30, 15, 10, 5])  # many, medium and few shot
MEMORY = 20
DIM = 6
NUM_TEST = np.array([10, 10, 10, 10, 10, 10, 10, 10, 0])  # a class without test images
# float32 quantities (Φ, s, β) read back in float64: a few float32 roundings (eps 1.2e-7) apart.
F32_RTOL = 1e-6


def constants(phase):
  start = sum(TASK_SIZES[:phase])
  return gr_jax.phase_constants(TRAIN_COUNTS, start, TASK_SIZES[phase], MEMORY)


def train_phase(consts, rng, steps=4):
  """A few real steps of the transform on random CE (and, with old classes, KD) gradients."""
  num_classes = TRAIN_COUNTS.size
  tx = gr_jax.gradient_reweighting()
  params = {"kernel": jnp.zeros((DIM, num_classes)), "bias": jnp.zeros((num_classes,))}
  state = tx.init(params)
  betas = []
  has_old = bool(np.any(consts.old_classes))
  for _ in range(steps):
    # Columns scaled like N_c: frequent classes get the large gradients, as in an imbalanced run.
    scale = np.sqrt(TRAIN_COUNTS)
    grads = {"kernel": jnp.asarray(rng.normal(size=(DIM, num_classes)) * scale, jnp.float32),
             "bias": jnp.asarray(rng.normal(size=num_classes), jnp.float32)}
    kd = random_tree(rng, num_classes) if has_old else None
    _, state = tx.update(grads, state, new_classes=consts.new_classes,
                         old_classes=consts.old_classes, kd_updates=kd, gamma=consts.gamma)
    betas.append(float(state.kd_scale))
  return state, diagnostics.KDScaleStats(float(np.mean(betas)), min(betas), max(betas))


def random_tree(rng, num_classes):
  return {"kernel": jnp.asarray(rng.normal(size=(DIM, num_classes)), jnp.float32),
          "bias": jnp.asarray(rng.normal(size=num_classes), jnp.float32)}


def phase_inputs(phase, rng):
  consts = constants(phase)
  seen = np.asarray(consts.old_classes | consts.new_classes)
  classifier = {"kernel": rng.normal(size=(DIM, TRAIN_COUNTS.size)).astype(np.float32),
                "bias": rng.normal(size=TRAIN_COUNTS.size).astype(np.float32)}
  correct = np.where(seen, rng.integers(0, NUM_TEST + 1), 0)
  return consts, classifier, correct


def simulate(reweight=True, seed=0):
  """The diagnostics of a 3-phase run."""
  diag = None
  for phase in range(len(TASK_SIZES)):
    rng = np.random.default_rng(100 * phase + seed)
    consts, classifier, correct = phase_inputs(phase, rng)
    state, stats = train_phase(consts, rng) if reweight else (None, None)
    record = diagnostics.phase_record(consts, TRAIN_COUNTS, classifier, correct, NUM_TEST,
                                      reweight_state=state, kd_scale_stats=stats)
    diag = diagnostics.append(diag, phase, record)
  return diag


def recorded(diag, index):
  """The record of the index-th recorded phase, as phase_record returned it."""
  return {k: v[index] for k, v in diag.items() if k != "phase"}


def test_record_holds_what_the_reweighting_state_holds():
  rng = np.random.default_rng(0)
  consts, classifier, correct = phase_inputs(2, rng)
  state, stats = train_phase(consts, rng)
  rec = diagnostics.phase_record(consts, TRAIN_COUNTS, classifier, correct, NUM_TEST,
                                 reweight_state=state, kd_scale_stats=stats)
  np.testing.assert_array_equal(rec["cumulative_norms"], np.asarray(state.cumulative_norms))
  np.testing.assert_array_equal(rec["cumulative_kd_norms"], np.asarray(state.cumulative_kd_norms))
  np.testing.assert_array_equal(rec["class_scale"], np.asarray(state.class_scale))
  assert rec["beta_last"] == float(state.kd_scale) > 0
  assert (rec["beta_mean"], rec["beta_min"], rec["beta_max"]) == stats
  assert stats.min <= stats.mean <= stats.max
  # α and r from the final Φ (docs/method.md §4, in float64 here) are the factors of the last step.
  old, new = np.asarray(consts.old_classes), np.asarray(consts.new_classes)
  phi = rec["cumulative_norms"]
  alpha = np.where(old, phi[old].min() / phi, np.where(new, phi[new].min() / phi, 0.0))
  np.testing.assert_allclose(rec["alpha"], alpha, rtol=F32_RTOL)
  q = phi[new].mean() / phi[old].mean()
  np.testing.assert_allclose([rec["r_old"], rec["r_new"]],
                             [min(1.0, q), min(1.0, float(consts.gamma) * q)], rtol=F32_RTOL)
  np.testing.assert_allclose(rec["class_scale"],
                             alpha * np.where(old, rec["r_old"], rec["r_new"]), rtol=F32_RTOL)


def test_record_copies_the_phase_constants_and_reads_the_classifier():
  rng = np.random.default_rng(1)
  consts, classifier, correct = phase_inputs(1, rng)
  rec = diagnostics.phase_record(consts, TRAIN_COUNTS, classifier, correct, NUM_TEST)
  np.testing.assert_array_equal(rec["train_counts"], TRAIN_COUNTS)
  np.testing.assert_array_equal(rec["prior_counts"], np.asarray(consts.class_counts))
  np.testing.assert_array_equal(rec["lost_counts"], np.asarray(consts.lost_counts))
  # R_c = N_c − min(N_c, M) for the old classes (positions 0..2), 0 elsewhere.
  np.testing.assert_array_equal(rec["lost_counts"], [480, 180, 100, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(rec["old_classes"], np.asarray(consts.old_classes))
  np.testing.assert_array_equal(rec["new_classes"], np.asarray(consts.new_classes))
  assert rec["gamma"] == float(consts.gamma) and rec["kd_weight"] == float(consts.kd_weight)
  assert rec["entropy"] == float(losses.lost_count_entropy(consts.lost_counts,
                                                           consts.old_classes))
  # The kernel's columns are the class rows W_c; float64 norms of float32 values.
  np.testing.assert_allclose(rec["weight_norm"],
                             np.linalg.norm(classifier["kernel"].astype(np.float64), axis=0),
                             rtol=1e-12)
  np.testing.assert_array_equal(rec["bias"], classifier["bias"])
  seen = np.arange(TRAIN_COUNTS.size) < 6
  np.testing.assert_allclose(rec["accuracy"][seen], 100 * correct[seen] / NUM_TEST[seen])
  assert np.isnan(rec["accuracy"][~seen]).all()
  # In phase 2 every class is seen; the last has no test images, so no accuracy.
  consts, classifier, correct = phase_inputs(2, rng)
  rec = diagnostics.phase_record(consts, TRAIN_COUNTS, classifier, correct, NUM_TEST)
  np.testing.assert_allclose(rec["accuracy"][:-1], 100 * correct[:-1] / NUM_TEST[:-1])
  assert np.isnan(rec["accuracy"][-1])


def test_run_without_reweighting_records_nan_unless_given_the_gradient_norms():
  rng = np.random.default_rng(2)
  consts, classifier, correct = phase_inputs(1, rng)
  rec = diagnostics.phase_record(consts, TRAIN_COUNTS, classifier, correct, NUM_TEST)
  for key in ("cumulative_norms", "cumulative_kd_norms", "alpha", "class_scale", "r_old", "r_new",
              "beta_mean", "beta_min", "beta_max", "beta_last"):
    assert np.isnan(rec[key]).all(), key
  assert np.isfinite(rec["weight_norm"]).all()
  phi = np.array([3.0, 6.0, 12.0, 2.0, 4.0, 8.0, 0.0, 0.0, 0.0])
  rec = diagnostics.phase_record(consts, TRAIN_COUNTS, classifier, correct, NUM_TEST,
                                 cumulative_grad_norms=phi)
  np.testing.assert_array_equal(rec["cumulative_norms"], phi)
  np.testing.assert_allclose(rec["alpha"], [1, 0.5, 0.25, 1, 0.5, 0.25, 0, 0, 0], rtol=F32_RTOL)
  # q = mean_new Φ / mean_old Φ = 14/21: the new classes were updated less than the old ones.
  np.testing.assert_allclose(rec["r_old"], 2 / 3, rtol=F32_RTOL)
  assert np.isnan(rec["class_scale"]).all() and np.isnan(rec["beta_last"])


def test_phase_zero_has_no_old_group_factor():
  rng = np.random.default_rng(3)
  consts, classifier, correct = phase_inputs(0, rng)
  state, stats = train_phase(consts, rng)
  rec = diagnostics.phase_record(consts, TRAIN_COUNTS, classifier, correct, NUM_TEST,
                                 reweight_state=state, kd_scale_stats=stats)
  assert np.isnan(rec["r_old"]) and rec["r_new"] == 1.0
  assert rec["beta_max"] == 0.0  # no KD in phase 0


def test_class_forgetting_agrees_with_task_forgetting_with_one_class_per_task():
  rng = np.random.default_rng(4)
  num_phases = 5
  num_test = np.full(num_phases, 20)
  seen = np.tri(num_phases, dtype=bool)  # class k arrives in phase k
  correct = np.where(seen, rng.integers(0, 21, size=(num_phases, num_phases)), 0)
  acc = np.where(seen, 100 * correct / num_test, np.nan)
  diag = {"accuracy": acc}  # [P, C]
  summary = metrics.summarize(correct, correct, num_test, [1] * num_phases, num_test)
  per_class = diagnostics.class_forgetting(diag)
  assert per_class.shape == (num_phases,)
  task_forgetting = np.asarray(summary["forgetting"][-1][:-1], np.float64)
  # Same counts, same max/difference order: equal up to float64 rounding of the percentages.
  np.testing.assert_allclose(per_class[:-1], task_forgetting, rtol=0, atol=1e-12)
  assert np.isnan(per_class[-1])  # new in the last phase: nothing to forget yet
  np.testing.assert_allclose(np.nanmean(per_class), summary["average_forgetting"], atol=1e-12)


def test_class_forgetting_on_a_task_matrix_is_task_forgetting():
  rng = np.random.default_rng(5)
  correct = rng.integers(0, 11, size=(4, 12))
  acc_tag, _ = metrics.accuracy_matrices(correct, correct, np.full(12, 10), [3, 3, 3, 3])
  np.testing.assert_array_equal(metrics.class_forgetting(acc_tag), metrics.forgetting(acc_tag))


def test_diagnostics_round_trip_and_resume_records_a_phase_once(tmp_path):
  diag = simulate()
  assert diag["phase"].tolist() == [0, 1, 2]
  assert diag["weight_norm"].shape == (3, TRAIN_COUNTS.size)
  assert diag["r_old"].shape == (3,)
  assert diagnostics.load(tmp_path) is None
  path = diagnostics.save(tmp_path, diag)
  assert path == os.path.join(tmp_path, "diagnostics.npz")
  assert os.listdir(tmp_path) == ["diagnostics.npz"]  # no temporary file left behind
  loaded = diagnostics.load(tmp_path)
  assert loaded.keys() == diag.keys()
  for key in diag:
    np.testing.assert_array_equal(loaded[key], diag[key], err_msg=key)
  # A run resumed inside phase 1 records phases 1 and 2 again: each stays once, the new values win.
  record = recorded(diag, 1)
  record["bias"] = record["bias"] + 1
  resumed = diagnostics.append(loaded, 1, record)
  assert resumed["phase"].tolist() == [0, 1]
  np.testing.assert_array_equal(resumed["bias"][1], diag["bias"][1] + 1)
  np.testing.assert_array_equal(resumed["bias"][0], diag["bias"][0])
  record["weight_norm"] = record["weight_norm"][:-1]
  with pytest.raises(ValueError, match="'weight_norm' of phase 3 .* the classes changed"):
    diagnostics.append(loaded, 3, record)


def test_load_refuses_a_file_that_is_not_diagnostics_in_one_line(tmp_path):
  (tmp_path / "diagnostics.npz").write_bytes(b"not an npz")
  with pytest.raises(ValueError, match="not a readable diagnostics file") as info:
    diagnostics.load(tmp_path)
  assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)
  other = tmp_path / "other.npz"
  np.savez(other, x=np.zeros(2))
  with pytest.raises(ValueError, match="without the diagnostics entries"):
    diagnostics.load(other)


def test_tensorboard_scalars_summarise_a_record_and_leave_out_what_is_missing():
  diag = simulate()
  scalars = diagnostics.tensorboard_scalars(recorded(diag, 2))
  for key in ("r_old", "r_new", "gamma", "kd_weight", "entropy", "beta_mean", "beta_min",
              "beta_max"):
    assert scalars[f"diag/{key}"] == diag[key][2], key
  old, new = diag["old_classes"][2], diag["new_classes"][2]
  # Float64 means over the same values in the same order: equal.
  assert scalars["diag/weight_norm_old_mean"] == diag["weight_norm"][2][old].mean()
  assert scalars["diag/weight_norm_new_mean"] == diag["weight_norm"][2][new].mean()
  phi = diag["cumulative_norms"][2]  # every class is seen in the last phase
  assert scalars["diag/phi_max_over_min"] == phi.max() / phi.min()
  finetune = simulate(reweight=False)
  scalars = diagnostics.tensorboard_scalars(recorded(finetune, 2))
  assert "diag/r_old" not in scalars and "diag/beta_mean" not in scalars
  assert np.isfinite(scalars["diag/weight_norm_new_mean"]) and "diag/entropy" in scalars


def test_correlations_rank_with_ties():
  x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
  pearson, spearman = diagnostics.correlations(x, np.exp(x))
  assert spearman == pytest.approx(1.0) and pearson < 0.95
  # Ties get their mean rank: ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4].
  _, spearman = diagnostics.correlations(np.array([1.0, 2.0, 2.0, 3.0]),
                                         np.array([1.0, 2.5, 2.5, 4.0]))
  assert spearman == pytest.approx(1.0)
  assert np.isnan(diagnostics.correlations(x, np.ones(5))).all()


def _png_size(path):
  data = pathlib.Path(path).read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"), len(data)


def test_plot_diagnostics_writes_the_four_panels(tmp_path):
  diag = simulate()
  path = diagnostics.plot_diagnostics(tmp_path, diag, phase=1)
  assert path == os.path.join(tmp_path, "diagnostics.png")
  width, height, size = _png_size(path)
  assert (width, height) == (1200, 850) and size > 30_000  # figsize (12, 8.5) at 100 dpi
  finetune = simulate(reweight=False)  # Φ and β missing: the panels say so, nothing fails
  assert _png_size(diagnostics.plot_diagnostics(tmp_path / "ft", finetune))[2] > 30_000
  with pytest.raises(ValueError, match="phase 7 is not recorded"):
    diagnostics.plot_diagnostics(tmp_path, diag, phase=7)


PLOT_SCRIPT = REPO / "launch" / "plot_results.py"


def save_multi_seed_run(workdir, seeds):
  """A multi-seed run's workdir: each seed's diagnostics in its seed_<s>, none at the top."""
  for seed in seeds:
    diagnostics.save(workdir / f"seed_{seed}", simulate(seed=seed))
  (workdir / "seed_notes").mkdir()  # not a seed folder


def test_plot_results_reads_a_multi_seed_run_as_its_first_seed(tmp_path):
  save_multi_seed_run(tmp_path, (10, 2))
  spec = importlib.util.spec_from_file_location("plot_results", PLOT_SCRIPT)
  plot_results = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(plot_results)
  load = plot_results._load_diagnostics  # pylint: disable=protected-access
  label, diag = load("DGR", str(tmp_path))
  assert label == "DGR (seed 2, first of 2)"  # seeds ordered by number, not by name
  np.testing.assert_array_equal(diag["weight_norm"], simulate(seed=2)["weight_norm"])
  assert load("DGR", str(tmp_path / "seed_10"))[0] == "DGR"  # a single seed's own workdir


def test_plot_results_script_draws_runs_side_by_side(tmp_path):
  diag = simulate()
  finetune = simulate(reweight=False)
  diagnostics.save(tmp_path / "dgr", diag)
  diagnostics.save(tmp_path / "ft", finetune)
  save_multi_seed_run(tmp_path / "pooled", (0, 1))
  out = tmp_path / "diag.png"
  script = str(PLOT_SCRIPT)
  env = dict(os.environ)  # the caller's XLA_FLAGS (e.g. the AVX2 run) reach the script's JAX
  wrong = (([f"x={tmp_path}"], "no diagnostics.npz"),
           ([f"x={tmp_path / 'dgr'}", "--phase=9"], "phase 9 is not recorded"),
           ([str(tmp_path / "dgr")], "label=<run workdir>"))
  done, *refused = run_side_by_side(
      [[sys.executable, script, "--diagnostics", f"--out={out}", f"DGR={tmp_path / 'dgr'}",
        f"finetune={tmp_path / 'ft'}", f"pooled={tmp_path / 'pooled'}"]]
      + [[sys.executable, script, "--diagnostics", f"--out={out}", *args] for args, _ in wrong],
      env=env)
  assert done.returncode == 0, done.stderr
  width, height, _ = _png_size(out)
  assert (width, height) == (1800, 1600)  # three columns of 6 x 16 inches at 100 dpi
  for (_, says), bad in zip(wrong, refused):
    assert bad.returncode != 0 and says in bad.stderr, bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()], "a one-line error"
