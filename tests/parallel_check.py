r"""1 vs N devices: the same short DGR run, once on one device and once data-parallel over N.

Run in its own process (the forced host device count must be set before JAX starts)::

  python tests/parallel_check.py 4,8 --data ../shared/data/cifar100.npz

It sets ``XLA_FLAGS=--xla_force_host_platform_device_count=`` (the largest N) and
``JAX_PLATFORMS=cpu``, then trains a 2-phase run (phase 0: intra-phase GR; phase 1: DGR with the
phase-0 model as teacher) once with ``config.num_devices=1`` and once with ``config.num_devices=N``
for each N given, through ``trainer.run`` in separate workdirs, and compares each N-device run with
the 1-device one (tolerances and their measured justification: ``TIGHT`` / ``CARRIED`` below):

  * every epoch's ``train/loss``, ``train/loss_ce``, ``train/loss_kd``, ``train/gr_beta`` and
    ``train/gr_scale_min`` from ``metrics.jsonl``;
  * every checkpoint both runs wrote (mid-phase 0, end of phase 0, mid-phase 1, end of phase 1):
    params, BatchNorm statistics, teacher, the whole ``opt_state`` and in it the reweighting state
    (Φ ``cumulative_norms``, ``class_scale``, β ``kd_scale``), exemplar memory and per-class test
    counts; leaf by leaf up to the end of phase 0, tree by tree (norm-wise) in phase 1;
  * ``results.json`` accuracies (exactly, when the final per-class test counts agree);
  * one DGR step of phase 1 from the *same* state on 1 and N devices (``isolated_dgr_step``).

It also checks that the N-device run really ran on N devices: the experiment's mesh has N devices,
the train step constrained its batch over that mesh (recorded while tracing), the carry the epoch
function returned lives on N devices, the compiled train steps (dumped HLO) are partitioned N ways
and contain all-reduces, and ``results.json`` lists N devices. Finally it checks that a batch size
that does not split over N devices is refused with ``parallel.check_batch``'s ValueError.

Prints one line per N starting with ``PARALLEL_OK`` with the largest absolute difference of each
group (``_p1``: end-to-end phase 1) and exits 0; on any mismatch prints ``PARALLEL_MISMATCH`` with
the reason and exits 1. Options: ``--epoch_as_scan``, ``--epochs``, ``--batch_size``,
``--learning_rate`` (0.01: see ``CARRIED``), ``--workdir`` (keep both runs).
"""

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description="1 vs N devices: the same short DGR run.")
  parser.add_argument("num_devices", type=lambda s: sorted({int(n) for n in s.split(",")}),
                      help="N, or N1,N2,...: the device counts of the parallel runs (one process "
                      "with the largest count of forced CPU devices; the 1-device run is shared)")
  parser.add_argument("--data", default=os.environ.get(
      "GR_JAX_DATA_NPZ", os.path.join(REPO, "..", "shared", "data", "cifar100.npz")))
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--learning_rate", type=float, default=0.01)
  parser.add_argument("--epoch_as_scan", default="false", choices=("true", "false"))
  parser.add_argument("--workdir", default=None, help="keep the two runs here (default: a tmp dir)")
  return parser.parse_args(argv)


if __name__ == "__main__":
  # Before JAX is imported: N host (CPU) devices, and only the CPU backend.
  ARGS = _parse_args()
  os.environ["XLA_FLAGS"] = " ".join(
      [f for f in os.environ.get("XLA_FLAGS", "").split()
       if not f.startswith("--xla_force_host_platform_device_count")]
      + [f"--xla_force_host_platform_device_count={max(ARGS.num_devices)}"])
  os.environ["JAX_PLATFORMS"] = "cpu"
  # The compiled train step / epoch is dumped to show that the N-device one all-reduces.
  import tempfile  # pylint: disable=g-import-not-at-top
  HLO_DUMP = tempfile.mkdtemp(prefix="parallel_check_hlo_")
  os.environ["XLA_FLAGS"] += (f" --xla_dump_to={HLO_DUMP} --xla_dump_hlo_as_text"
                              " --xla_dump_hlo_module_re=.*train_(step|epochs?)$")

sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import glob
import json
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from gr_jax import checkpoint as ckpt
from gr_jax import parallel
from gr_jax import trainer
from gr_jax.reweight import GradientReweightingState
from tiny_run import tiny_config

# Float tolerances. The N-device run sums gradients, BatchNorm moments and the per-class norms in a
# different order (per-shard partial sums, then an all-reduce), so 1 and N devices differ by float32
# rounding. TIGHT applies to everything computed from identical inputs through well-conditioned
# steps: all of phase 0 (intra-phase GR; measured ≤ 2e-7), the phase boundary (herding, evaluation,
# fresh heads, teacher; exact or ≤ 2e-7).
TIGHT = dict(rtol=1e-4, atol=1e-5)
# ISOLATED applies to one DGR step of phase 1 taken from the same state on 1 and N devices
# (``isolated_dgr_step``): a batch of 13 real rows and 3 masked ones, split 2 rows a device on 8.
# BatchNorm's one-pass variance E[x²] − E[x]² cancels where a channel's batch mean is large against
# its spread, so the shard-wise summation order shows up in single elements (measured on 8 devices:
# max |Δ| 1.2e-4, worst element 0.93 of rtol 2e-3 + atol 5e-5; the two-pass variance gave ≤ 2e-7).
# Data-parallel bugs (a per-shard gradient or moment, a wrong count) are O(1) relative and still
# fail by orders of magnitude.
ISOLATED = dict(rtol=5e-3, atol=5e-5)
# CARRIED applies to the end-to-end phase-1 values. Phase 1 of this tiny run is ill-conditioned: a
# relative perturbation of 1e-7 of the params (float32 rounding) grows ~50x per DGR step on ONE
# device, exactly as the 1-vs-N difference does (measured: 7e-6 after 2 steps, 4e-5 after 4, from
# the same start), and a 1-device phase 1 started from the N-device phase-0 checkpoint differs from
# the 1-device run as much as the N-device run does. So over a whole phase only a norm-wise sanity
# bound is meaningful (measured worst: 3e-3 of a tree's norm, 2e-4 relative in β); per-step
# correctness of DGR on N devices is what ``isolated_dgr_step`` checks at ISOLATED. Errors of the kind
# data parallelism can introduce (a per-shard gradient, BN moment or norm, a batch mean over the
# wrong count) are O(1) relative and fail both.
CARRIED = dict(rtol=5e-2, atol=1e-6, norm=True)
LOSS_KEYS = ("train/loss", "train/loss_ce", "train/loss_kd", "train/gr_beta", "train/gr_scale_min")


class Mismatch(AssertionError):
  pass


def make_config(data: str, num_devices: int, batch_size: int, epochs: int, scan: str,
                learning_rate: float = 0.01):
  """Two phases of CIFAR-100-LT (4 + 4 classes): the tiny run of the trainer tests, cut short."""
  return tiny_config(data, **{
      "protocol.num_classes": 8, "protocol.num_tasks": 2, "optim.batch_size": batch_size,
      "optim.epochs": epochs, "optim.learning_rate": learning_rate, "checkpoint.keep": 100,
      "epoch_as_scan": scan, "num_devices": num_devices})


class _Recorder:
  """Captures the run's Experiment, the meshes the batch was constrained over, epoch outputs."""

  def __init__(self):
    self.exp = None
    self.constraint_mesh_sizes = []
    self.output_device_counts = []
    self._build = trainer.build_experiment
    self._shard = parallel.shard_batch_axis

  def __enter__(self):
    def shard(x, mesh, axis=0):
      self.constraint_mesh_sizes.append(mesh.size)
      return self._shard(x, mesh, axis)

    def build(config):
      exp = self._build(config)
      def wrap(fns):  # StepFns.train_epochs (older trees: train_epoch)
        name = "train_epochs" if "train_epochs" in fns._fields else "train_epoch"
        return fns._replace(**{name: self._wrap_epoch(getattr(fns, name))})
      self.exp = dataclasses.replace(exp, base_steps=wrap(exp.base_steps),
                                     incremental_steps=wrap(exp.incremental_steps))
      return self.exp

    parallel.shard_batch_axis = shard
    trainer.build_experiment = build
    return self

  def _wrap_epoch(self, train_epoch):
    def epoch(carry, *args):
      out = train_epoch(carry, *args)
      self.output_device_counts.extend(
          len(leaf.sharding.device_set) for leaf in jax.tree.leaves(out[0]))
      return out
    return epoch

  def __exit__(self, *exc):
    parallel.shard_batch_axis = self._shard
    trainer.build_experiment = self._build


def train(config, workdir):
  with _Recorder() as rec:
    results = trainer.run(config, workdir)
  return results, rec


def _epoch_metrics(workdir):
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [l for l in lines if "train/loss" in l]


_ABSTRACT = {}


def _checkpoints(workdir, exp):
  """{step: state} of every checkpoint in ``workdir``, restored onto ``exp``'s mesh."""
  if id(exp) not in _ABSTRACT:
    _ABSTRACT[id(exp)] = (exp, ckpt.abstract_like(trainer.init_state(exp)))
  abstract = _ABSTRACT[id(exp)][1]
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state",))
  try:
    return {step: manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"] for step in manager.all_steps()}
  finally:
    manager.close()


def _gr_state(opt_state):
  found = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, GradientReweightingState))
           if isinstance(s, GradientReweightingState)]
  if len(found) != 1:
    raise Mismatch(f"expected one GradientReweightingState in opt_state, found {len(found)}")
  return found[0]


class Diffs:
  """Largest absolute differences per group, and the assertion with a readable name."""

  def __init__(self):
    self.max = {}
    self.worst = {}  # group -> largest |got - want| / (atol + rtol |want|): < 1 passes

  def close(self, group, name, got, want, tol=None):
    tol = tol or TIGHT
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
      raise Mismatch(f"{name}: shape {got.shape} (N devices) vs {want.shape} (1 device)")
    if not got.size:
      return
    diff = np.abs(got - want)
    self.max[group] = max(self.max.get(group, 0.0), float(np.max(diff)))
    if tol.get("norm"):
      bound = tol["atol"] + tol["rtol"] * np.linalg.norm(want)
      ratio = float(np.linalg.norm(got - want) / bound)
      self.worst[group] = max(self.worst.get(group, 0.0), ratio)
      if ratio >= 1:
        raise Mismatch(f"{name} differs between 1 and N devices: ‖Δ‖ = "
                       f"{np.linalg.norm(got - want):.3g} > {tol['rtol']} ‖1-device‖ + "
                       f"{tol['atol']} = {bound:.3g} (max |Δ| {np.max(diff):.3g})")
      return
    ratio = float(np.max(diff / (tol["atol"] + tol["rtol"] * np.abs(want))))
    self.worst[group] = max(self.worst.get(group, 0.0), ratio)
    try:
      np.testing.assert_allclose(got, want, err_msg=name, rtol=tol["rtol"], atol=tol["atol"])
    except AssertionError as err:
      raise Mismatch(f"{name} differs between 1 and N devices:\n{err}") from None

  def equal(self, name, got, want):
    got, want = np.asarray(got), np.asarray(want)
    if not np.array_equal(got, want):
      raise Mismatch(f"{name} differs between 1 and N devices:\n1 device: {want.tolist()}\n"
                     f"N devices: {got.tolist()}")


def _before_phase1_training(state) -> bool:
  """Phase 0 checkpoints and the one written at the phase boundary (phase 1, epoch 0)."""
  phase, epoch = int(state.phase[0]), int(state.epoch[0])
  return phase == 0 or (phase == 1 and epoch == 0)


def compare(wd1, exp1, res1, wdn, expn, resn, diffs: Diffs):
  """End-to-end comparison of the two runs; returns the 1-device run's checkpoints."""
  # Per-epoch losses and GR statistics (metrics.jsonl).
  m1, mn = _epoch_metrics(wd1), _epoch_metrics(wdn)
  if [(l["phase"], l["epoch"]) for l in m1] != [(l["phase"], l["epoch"]) for l in mn]:
    raise Mismatch(f"different epochs logged: {len(m1)} vs {len(mn)} records")
  if not any(l["phase"] > 0 and l["train/loss_kd"] > 0 for l in m1):
    raise Mismatch("no DGR epoch with a positive KD loss: phase 1 did not distil from a teacher")
  for key in LOSS_KEYS:
    for a, b in zip(mn, m1):
      tight = a["phase"] == 0
      diffs.close("loss" if tight else "loss_p1", f"{key} (phase {a['phase']} epoch {a['epoch']})",
                  a[key], b[key], TIGHT if tight else CARRIED)
  # Full states of every checkpoint.
  c1, cn = _checkpoints(wd1, exp1), _checkpoints(wdn, expn)
  if sorted(c1) != sorted(cn) or len(c1) < 4:
    raise Mismatch(f"checkpoint steps differ or are too few: {sorted(c1)} vs {sorted(cn)}")
  for step in sorted(c1):
    s1, sn = c1[step], cn[step]
    tight = _before_phase1_training(s1)
    tol, suffix = (TIGHT, "") if tight else (CARRIED, "_p1")
    for name in ("phase", "epoch", "step", "memory"):
      diffs.equal(f"checkpoint {step} {name}", getattr(sn, name), getattr(s1, name))
    for name in ("correct_tag", "correct_taw"):
      if tight:
        diffs.equal(f"checkpoint {step} {name}", getattr(sn, name), getattr(s1, name))
      else:  # carried differences may flip the prediction of at most one borderline test image
        flips = int(np.abs(np.asarray(getattr(sn, name)) - np.asarray(getattr(s1, name))).sum())
        diffs.max["test_flips_p1"] = max(diffs.max.get("test_flips_p1", 0), flips)
        if flips > 1:
          raise Mismatch(f"checkpoint {step} {name}: {flips} test predictions differ")
    g1, gn = _gr_state(s1.opt_state), _gr_state(sn.opt_state)
    trees = [("params", "params", sn.params, s1.params),
             ("batch_stats", "batch_stats", sn.batch_stats, s1.batch_stats),
             ("params", "teacher_params", sn.teacher_params, s1.teacher_params),
             ("batch_stats", "teacher_batch_stats", sn.teacher_batch_stats,
              s1.teacher_batch_stats),
             ("opt_state", "opt_state", sn.opt_state, s1.opt_state)]
    trees += [("gr_state", f"opt_state GR {name}", getattr(gn, name), getattr(g1, name))
              for name in GradientReweightingState._fields]
    for group, field, tree_n, tree_1 in trees:
      flatn = jax.tree_util.tree_leaves_with_path(tree_n)
      flat1 = jax.tree_util.tree_leaves_with_path(tree_1)
      if tight:  # leaf by leaf, element by element
        for (path, a), (_, b) in zip(flatn, flat1):
          diffs.close(group, f"checkpoint {step} {field}{jax.tree_util.keystr(path)}", a, b, tol)
      else:  # the whole tree as one vector (CARRIED is a norm-wise bound)
        vec = lambda flat: np.concatenate([np.ravel(np.asarray(x, np.float64)) for _, x in flat])
        diffs.close(group + suffix, f"checkpoint {step} {field} (all leaves)", vec(flatn),
                    vec(flat1), tol)
  # Accuracies (results.json): equal whenever the final per-class counts are.
  last1, lastn = c1[max(c1)], cn[max(cn)]
  if (np.array_equal(last1.correct_tag, lastn.correct_tag)
      and np.array_equal(last1.correct_taw, lastn.correct_taw)):
    for key in ("acc_tag", "acc_taw", "per_class_accuracy", "average_incremental_accuracy"):
      a = np.nan_to_num(np.asarray(resn[key], dtype=float))
      b = np.nan_to_num(np.asarray(res1[key], dtype=float))
      diffs.close("accuracy", f"results.json {key}", a, b, dict(rtol=0, atol=1e-9))
  # The GR state must have been exercised: Φ > 0 for the seen classes at the end of phase 1.
  phi = np.asarray(_gr_state(last1.opt_state).cumulative_norms)
  beta = np.asarray(_gr_state(last1.opt_state).kd_scale)
  if not (np.count_nonzero(phi) >= 8 and np.all(beta > 0)):
    raise Mismatch(f"DGR state not exercised at the end: Φ={phi.tolist()} β={beta.tolist()}")
  return c1


def isolated_dgr_step(states1, exp1, expn, diffs: Diffs, learning_rate: float = 0.1):
  """One DGR step of phase 1 on 1 and on N devices from the same state, at the paper's lr.

  Both start from the 1-device run's end-of-phase-0 checkpoint (restored onto each mesh) and run the
  trainer's incremental epoch function on phase data cut to one batch with 3 padding rows (masked),
  so the step sees the teacher, the KD and CE gradients, DGR's Φ, α, r, β and masked global BN.
  """
  batch = exp1.config.optim.batch_size
  start = states1[min(k for k, v in states1.items() if int(v.phase[0]) == 1)]
  out = {}
  for exp in (exp1, expn):
    # A fresh copy on the run's mesh: the epoch function donates its carry.
    sharding = parallel.replicated(exp.mesh)
    st = jax.tree.map(lambda x: jax.device_put(np.array(x), sharding), start)  # pylint: disable=cell-var-from-loop
    data = trainer._phase_data(exp, st, 1)  # pylint: disable=protected-access
    data = data._replace(size=parallel.replicate(jnp.int32(batch - 3), exp.mesh))
    consts = trainer._constants(exp, 1)  # pylint: disable=protected-access
    keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.wrap_key_data(k), 77))(st.key)
    carry = (st.params, st.batch_stats, st.opt_state, st.step)
    teacher = (st.teacher_params, st.teacher_batch_stats)
    fns = exp.incremental_steps
    if "train_epochs" in fns._fields:  # E epochs per call: keys [S, E], learning rates [E]
      carry, metrics = fns.train_epochs(carry, teacher, data, consts, keys[:, None],
                                        jnp.full((1,), learning_rate, jnp.float32))
    else:
      carry, metrics = fns.train_epoch(carry, teacher, data, consts, keys,
                                       jnp.float32(learning_rate))
    out[exp.mesh.size] = jax.tree.map(np.asarray, (carry, metrics))
  (c1, m1), (cn, mn) = out[1], out[expn.mesh.size]
  if int(np.ravel(c1[3])[0]) != int(np.ravel(start.step)[0]) + 1 or not np.all(m1["loss_kd"] > 0):
    raise Mismatch(f"isolated DGR step: expected one step with a KD loss, got step "
                   f"{np.ravel(c1[3]).tolist()} and KD loss {np.ravel(m1['loss_kd']).tolist()}")
  for key in ("loss", "loss_ce", "loss_kd", "gr_beta", "gr_scale_min"):
    diffs.close("isolated", f"isolated DGR step {key}", mn[key], m1[key], ISOLATED)
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(cn),
                               jax.tree_util.tree_leaves_with_path(c1)):
    diffs.close("isolated", f"isolated DGR step carry{jax.tree_util.keystr(path)}", a, b, ISOLATED)
  g1, gn = _gr_state(c1[2]), _gr_state(cn[2])
  for name in GradientReweightingState._fields:
    diffs.close("isolated", f"isolated DGR step GR {name}", getattr(gn, name), getattr(g1, name),
                ISOLATED)


def check_used_devices(n, expn, recn, resn):
  if expn.mesh.size != n:
    raise Mismatch(f"num_devices={n} run built a mesh of {expn.mesh.size} devices")
  if len(resn["devices"]) != n:
    raise Mismatch(f"results.json lists devices {resn['devices']}, expected {n}")
  if not recn.constraint_mesh_sizes or set(recn.constraint_mesh_sizes) != {n}:
    raise Mismatch(f"the train step constrained its batch over meshes of sizes "
                   f"{sorted(set(recn.constraint_mesh_sizes))}, expected only {n}")
  if not recn.output_device_counts or set(recn.output_device_counts) != {n}:
    raise Mismatch(f"train_epoch returned arrays on {sorted(set(recn.output_device_counts))} "
                   f"devices, expected {n}")
  # The compiled train steps (looped epochs) or epochs (epoch_as_scan) of the N-device run: one
  # per step kind (base, incremental), partitioned N ways, reducing across the devices.
  modules = sorted(glob.glob(os.path.join(HLO_DUMP, "*.jit_train_*cpu_after_optimizations.txt")))
  texts = [open(m).read() for m in modules]
  partitioned = [t for t in texts if f"num_partitions={n}" in t.split("\n", 1)[0]]
  if len(partitioned) < 2 or not all("all-reduce" in t for t in partitioned):
    raise Mismatch(f"expected the base and incremental train steps compiled for {n} partitions "
                   f"with all-reduces; found {len(partitioned)} partitioned of {len(texts)} dumped "
                   f"modules in {HLO_DUMP}, all-reduce in "
                   f"{sum('all-reduce' in t for t in partitioned)}")
  return len(partitioned)


def check_indivisible_batch(data, n, scan):
  config = make_config(data, n, batch_size=4 * n + 1, epochs=1, scan=scan)
  try:
    trainer.build_experiment(config)
  except ValueError as err:
    if f"does not split over {n} devices" not in str(err):
      raise Mismatch(f"unexpected ValueError for batch {4 * n + 1} on {n} devices: {err}") from None
    return
  raise Mismatch(f"batch size {4 * n + 1} on {n} devices was accepted")


def main(args):
  counts = args.num_devices
  if len(jax.devices()) != max(counts):
    raise SystemExit(f"PARALLEL_MISMATCH expected {max(counts)} forced CPU devices, JAX sees "
                     f"{len(jax.devices())} ({jax.devices()}); was jax imported before XLA_FLAGS?")
  if any(args.batch_size % n for n in counts):
    raise SystemExit(f"--batch_size {args.batch_size} must be a multiple of each of {counts}")
  lines = []
  n = 1
  try:
    with tempfile.TemporaryDirectory() as tmp:
      root = args.workdir or tmp
      runs = {}
      for devices in [1] + [c for c in counts if c != 1]:
        n = devices
        if devices > 1:
          check_indivisible_batch(args.data, devices, args.epoch_as_scan)
        wd = os.path.join(root, f"devices_{devices}")
        config = make_config(args.data, devices, args.batch_size, args.epochs, args.epoch_as_scan,
                             args.learning_rate)
        tic = time.time()
        runs[devices] = (wd,) + train(config, wd)
        print(f"{devices} device(s): trained in {time.time() - tic:.1f}s", file=sys.stderr)
        if devices == 1:
          if runs[1][2].exp.mesh.size != 1:
            raise Mismatch(f"num_devices=1 run built a mesh of {runs[1][2].exp.mesh.size} devices")
          continue
        (wd1, res1, rec1), (wdn, resn, recn) = runs[1], runs[devices]
        partitioned = check_used_devices(devices, recn.exp, recn, resn)
        diffs = Diffs()
        states1 = compare(wd1, rec1.exp, res1, wdn, recn.exp, resn, diffs)
        isolated_dgr_step(states1, rec1.exp, recn.exp, diffs)
        summary = " ".join(f"{k}={v:.3g}" for k, v in sorted(diffs.max.items()))
        margin = " ".join(f"{k}={v:.2f}" for k, v in sorted(diffs.worst.items()))
        print(f"devices={devices} diff / tolerance (pass < 1): {margin}", file=sys.stderr)
        lines.append(f"PARALLEL_OK devices={devices} batch={args.batch_size} epochs={args.epochs} "
                     f"scan={args.epoch_as_scan} lr={args.learning_rate} "
                     f"checkpoints={len(states1)} partitioned_train_modules={partitioned} "
                     f"max_abs_diff: {summary}")
  except Mismatch as err:
    print(f"PARALLEL_MISMATCH devices={n}: {err}", flush=True)
    return 1
  print("\n".join(lines), flush=True)
  return 0


if __name__ == "__main__":
  try:
    code = main(ARGS)
  finally:
    shutil.rmtree(HLO_DUMP, ignore_errors=True)
  sys.exit(code)
