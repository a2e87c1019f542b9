r"""1 vs N devices: the same short DGR run, once on one device and once data-parallel over N.

Run in its own process (the forced host device count must be set before JAX starts)::

  python tests/parallel_check.py 4 --data ../shared/data/cifar100.npz

It sets ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` and ``JAX_PLATFORMS=cpu``, then
trains a 2-phase run (phase 0: intra-phase GR; phase 1: DGR with the phase-0 model as teacher) with
``config.num_devices=1`` and with ``config.num_devices=N`` through ``trainer.run`` in two workdirs,
and compares, with ``np.testing.assert_allclose``:

  * every epoch's ``train/loss``, ``train/loss_ce``, ``train/loss_kd``, ``train/gr_beta`` and
    ``train/gr_scale_min`` from ``metrics.jsonl``;
  * the accuracy matrices and per-class accuracies of ``results.json``;
  * every checkpoint both runs wrote (mid-phase 0, end of phase 0, mid-phase 1, end of phase 1): the
    params, BatchNorm statistics, teacher, exemplar memory, per-class correct counts and the
    reweighting state in ``opt_state`` (Φ ``cumulative_norms``, ``class_scale``, β ``kd_scale``),
    leaf by leaf.

It also checks that the N-device run really ran on N devices: the experiment's mesh has N devices,
the train step constrained its batch over that mesh (recorded while tracing), the state the epoch
returned lives on N devices, the compiled epoch contains cross-device reductions, and
``results.json`` lists N devices. Finally it checks that a batch size that does not split over N
devices is refused with ``parallel.check_batch``'s ValueError.

Prints one line starting with ``PARALLEL_OK`` and the largest differences, and exits 0; on any
mismatch prints ``PARALLEL_MISMATCH`` with the reason and exits 1.
"""

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description="1 vs N devices: the same short DGR run.")
  parser.add_argument("num_devices", type=int, help="N: forced CPU devices of the parallel run")
  parser.add_argument("--data", default=os.environ.get(
      "GR_JAX_DATA_NPZ", os.path.join(REPO, "..", "shared", "data", "cifar100.npz")))
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--epoch_as_scan", default="false", choices=("true", "false"))
  parser.add_argument("--workdir", default=None, help="keep the two runs here (default: a tmp dir)")
  return parser.parse_args(argv)


if __name__ == "__main__":
  # Before JAX is imported: N host (CPU) devices, and only the CPU backend.
  ARGS = _parse_args()
  os.environ["XLA_FLAGS"] = " ".join(
      [f for f in os.environ.get("XLA_FLAGS", "").split()
       if not f.startswith("--xla_force_host_platform_device_count")]
      + [f"--xla_force_host_platform_device_count={ARGS.num_devices}"])
  os.environ["JAX_PLATFORMS"] = "cpu"

sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import json
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp

from configs import cifar100_lt
from gr_jax import checkpoint as ckpt
from gr_jax import parallel
from gr_jax import trainer
from gr_jax.reweight import GradientReweightingState

# Float tolerance. The N-device run sums gradients, BatchNorm moments and the per-class norms in a
# different order (per-shard partial sums, then an all-reduce), so the two runs differ by float32
# rounding that momentum SGD carries forward over the steps; these bounds leave room for that and
# nothing else (a wrong reduction, e.g. per-shard BN statistics or a per-shard gradient, is off by
# orders of magnitude more).
RTOL, ATOL = 1e-4, 1e-5
LOSS_KEYS = ("train/loss", "train/loss_ce", "train/loss_kd", "train/gr_beta", "train/gr_scale_min")


class Mismatch(AssertionError):
  pass


def make_config(data: str, num_devices: int, batch_size: int, epochs: int, scan: str):
  """Two phases of CIFAR-100-LT (4 + 4 classes), ResNet-8, a few images a class."""
  c = cifar100_lt.get_config("smoke")
  c.data.source = "npz"
  c.data.path = data
  c.model = "resnet8"
  c.protocol.num_classes = 8
  c.protocol.nc_first_task = 4
  c.protocol.num_tasks = 2
  c.protocol.max_train_per_class = 12
  c.protocol.max_test_per_class = 6
  c.optim.batch_size = batch_size
  c.optim.epochs = epochs
  c.optim.milestones = (1,)
  c.memory.per_class = 5
  c.eval_chunk = 16
  c.checkpoint.every_epochs = 1
  c.checkpoint.keep = 100
  c.epoch_as_scan = scan
  c.num_devices = num_devices
  return c


class _Recorder:
  """Captures the run's Experiment, the meshes the batch was constrained over, epoch outputs."""

  def __init__(self):
    self.exp = None
    self.constraint_mesh_sizes = []
    self.output_device_counts = []
    self.hlo = None
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
      if self.hlo is None and hasattr(train_epoch, "lower"):
        # epoch_as_scan: the epoch is one jitted function; keep its compiled HLO (cached compile).
        self.hlo = train_epoch.lower(carry, *args).compile().as_text()
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


def _checkpoints(workdir, exp):
  """{step: state} of every checkpoint in ``workdir``, restored onto ``exp``'s mesh."""
  abstract = ckpt.abstract_like(trainer.init_state(exp))
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

  def close(self, group, name, got, want, rtol=RTOL, atol=ATOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
      raise Mismatch(f"{name}: shape {got.shape} (N devices) vs {want.shape} (1 device)")
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    self.max[group] = max(self.max.get(group, 0.0), diff)
    try:
      np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)
    except AssertionError as err:
      raise Mismatch(f"{name} differs between 1 and N devices:\n{err}") from None

  def equal(self, name, got, want):
    got, want = np.asarray(got), np.asarray(want)
    if not np.array_equal(got, want):
      raise Mismatch(f"{name} differs between 1 and N devices:\n1 device: {want.tolist()}\n"
                     f"N devices: {got.tolist()}")


def compare(wd1, exp1, res1, wdn, expn, resn, diffs: Diffs):
  # Per-epoch losses and GR statistics (metrics.jsonl).
  m1, mn = _epoch_metrics(wd1), _epoch_metrics(wdn)
  if [(l["phase"], l["epoch"]) for l in m1] != [(l["phase"], l["epoch"]) for l in mn]:
    raise Mismatch(f"different epochs logged: {len(m1)} vs {len(mn)} records")
  if not any(l["phase"] > 0 and l["train/loss_kd"] > 0 for l in m1):
    raise Mismatch("no DGR epoch with a positive KD loss: phase 1 did not distil from a teacher")
  for key in LOSS_KEYS:
    for a, b in zip(mn, m1):
      diffs.close("loss", f"{key} (phase {a['phase']} epoch {a['epoch']})", a[key], b[key])
  # Accuracies (results.json).
  for key in ("acc_tag", "acc_taw", "per_class_accuracy", "average_incremental_accuracy"):
    a = np.asarray(resn[key], dtype=float)
    b = np.asarray(res1[key], dtype=float)
    diffs.close("accuracy", f"results.json {key}", np.nan_to_num(a), np.nan_to_num(b),
                rtol=0, atol=1e-9)
  # Full states of every checkpoint.
  c1, cn = _checkpoints(wd1, exp1), _checkpoints(wdn, expn)
  if sorted(c1) != sorted(cn) or len(c1) < 4:
    raise Mismatch(f"checkpoint steps differ or are too few: {sorted(c1)} vs {sorted(cn)}")
  for step in sorted(c1):
    s1, sn = c1[step], cn[step]
    for name in ("phase", "epoch", "step", "memory", "correct_tag", "correct_taw"):
      diffs.equal(f"checkpoint {step} {name}", getattr(sn, name), getattr(s1, name))
    for field in ("params", "batch_stats", "teacher_params", "teacher_batch_stats"):
      flat1 = jax.tree_util.tree_leaves_with_path(getattr(s1, field))
      flatn = jax.tree_util.tree_leaves_with_path(getattr(sn, field))
      for (path, a), (_, b) in zip(flatn, flat1):
        diffs.close("params" if "params" in field else "batch_stats",
                    f"checkpoint {step} {field}{jax.tree_util.keystr(path)}", a, b)
    g1, gn = _gr_state(s1.opt_state), _gr_state(sn.opt_state)
    for name in GradientReweightingState._fields:
      diffs.close("gr_state", f"checkpoint {step} opt_state GR {name}", getattr(gn, name),
                  getattr(g1, name))
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(sn.opt_state),
                                 jax.tree_util.tree_leaves_with_path(s1.opt_state)):
      diffs.close("opt_state", f"checkpoint {step} opt_state{jax.tree_util.keystr(path)}", a, b)
  # The GR state must have been exercised: Φ > 0 for the seen classes at the end of phase 1.
  last = c1[max(c1)]
  phi = np.asarray(_gr_state(last.opt_state).cumulative_norms)
  beta = np.asarray(_gr_state(last.opt_state).kd_scale)
  if not (np.count_nonzero(phi) >= 8 and np.all(beta > 0)):
    raise Mismatch(f"DGR state not exercised at the end: Φ={phi.tolist()} β={beta.tolist()}")
  return len(c1)


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
  if recn.hlo is not None and "all-reduce" not in recn.hlo:
    raise Mismatch("the compiled N-device epoch contains no all-reduce: the batch was not split")


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
  n = args.num_devices
  if len(jax.devices()) != n:
    raise SystemExit(f"PARALLEL_MISMATCH expected {n} forced CPU devices, JAX sees "
                     f"{len(jax.devices())} ({jax.devices()}); was jax imported before XLA_FLAGS?")
  if args.batch_size % n:
    raise SystemExit(f"--batch_size {args.batch_size} must be a multiple of {n}")
  try:
    check_indivisible_batch(args.data, n, args.epoch_as_scan)
    with tempfile.TemporaryDirectory() as tmp:
      root = args.workdir or tmp
      runs = {}
      for devices in (1, n):
        wd = os.path.join(root, f"devices_{devices}")
        config = make_config(args.data, devices, args.batch_size, args.epochs, args.epoch_as_scan)
        runs[devices] = (wd,) + train(config, wd)
      (wd1, res1, rec1), (wdn, resn, recn) = runs[1], runs[n]
      if rec1.exp.mesh.size != 1:
        raise Mismatch(f"num_devices=1 run built a mesh of {rec1.exp.mesh.size} devices")
      check_used_devices(n, recn.exp, recn, resn)
      diffs = Diffs()
      num_ckpt = compare(wd1, rec1.exp, res1, wdn, recn.exp, resn, diffs)
  except Mismatch as err:
    print(f"PARALLEL_MISMATCH devices={n}: {err}", flush=True)
    return 1
  summary = " ".join(f"{k}={v:.3g}" for k, v in sorted(diffs.max.items()))
  print(f"PARALLEL_OK devices={n} batch={args.batch_size} epochs={args.epochs} "
        f"scan={args.epoch_as_scan} checkpoints={num_ckpt} max_abs_diff: {summary}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(ARGS))
