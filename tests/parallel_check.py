r"""1 vs N devices: the same short GR/DGR run, once on one device and once data-parallel over N.

Run in its own process (the forced host device count must be set before JAX starts)::

  python tests/parallel_check.py 2,4 [--data ../shared/data/cifar100.npz]

It adds ``--xla_force_host_platform_device_count`` (the largest N) and an HLO dump to the caller's
``XLA_FLAGS``, then trains a 2-phase run (phase 0: intra-phase GR; phase 1: DGR distilling from
the phase-0 model) on the synthetic dataset of ``tiny_run`` (or ``--data``) through the trainer's
public ``build_experiment`` / ``run_seed``: with ``num_devices=1``, once more on one device from
params perturbed by one ulp (the yardstick, below), and with ``num_devices=N`` for each N.

What is compared, checkpoint by checkpoint (every epoch) and for one isolated DGR step:

* exactly: phase, epoch and step counters, the PRNG key, the teacher of phase 0, the exemplar
  memory (herding) and the per-class test counts (so ``results.json``'s accuracies);
* norm-wise per tree (params, BatchNorm statistics, teacher, optimiser state, and each field of
  the reweighting state Φ, α·r, β, Σh) and per logged epoch loss: within a tolerance derived from
  float32 rounding, measured in the same process (``Yardstick``).

It also checks that the N-device run ran partitioned N ways: its mesh, the devices its train
state lives on, and the dumped HLO of its compiled train programs (``_epoch_step`` for the looped
epochs, ``train_epochs`` for ``--epoch_as_scan=true``) with ``num_partitions=N`` and all-reduces.

Prints ``PARALLEL_OK devices=N ...`` per N with each group's largest difference / tolerance ratio
(pass < 1) and exits 0; on a mismatch prints ``PARALLEL_MISMATCH`` with the reason and exits 1.
"""

import argparse
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("num_devices", type=lambda s: sorted({int(n) for n in s.split(",")} - {1}),
                      help="N1,N2,...: device counts of the parallel runs (one process, one "
                      "1-device reference)")
  parser.add_argument("--data", default=None, help="an npz dataset (default: a synthetic one)")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--epochs", type=int, default=2)
  # At 0.01, phase 1 of this tiny run amplifies a one-ulp perturbation of the params ~300x within
  # an epoch: the yardstick then exceeds a tenth of the run's own update (``check_meaningful``).
  parser.add_argument("--learning_rate", type=float, default=0.001)
  parser.add_argument("--epoch_as_scan", default="false", choices=("true", "false"),
                      help="epochs as one lax.scan (the GPU path) instead of a loop of steps")
  parser.add_argument("--workdir", default=None, help="keep the runs here (default: a tmp dir)")
  parser.add_argument("--verbose", action="store_true", help="print every comparison")
  return parser.parse_args(argv)


if __name__ == "__main__":
  # Before JAX starts: N host devices and the HLO dump, added to the caller's XLA_FLAGS.
  ARGS = _parse_args()
  HLO_DUMP = tempfile.mkdtemp(prefix="parallel_check_hlo_")
  os.environ["XLA_FLAGS"] = " ".join(
      [f for f in os.environ.get("XLA_FLAGS", "").split()
       if not f.startswith(("--xla_force_host_platform_device_count", "--xla_dump"))]
      + [f"--xla_force_host_platform_device_count={max(ARGS.num_devices)}",
         f"--xla_dump_to={HLO_DUMP}", "--xla_dump_hlo_as_text",
         "--xla_dump_hlo_module_re=.*(_epoch_step|train_epochs)$"])
  os.environ["JAX_PLATFORMS"] = "cpu"

sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import glob
import json
import math
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

import compile_events

from gr_jax import checkpoint as ckpt
from gr_jax import optim
from gr_jax import parallel
from gr_jax import trainer
from tiny_run import tiny_config
from tiny_run import write_synthetic_npz

U = 2.0 ** -24  # float32 unit roundoff


class Mismatch(AssertionError):
  pass


def make_config(data, num_devices, args):
  """Two phases (4 + 4 classes) of the trainer tests' tiny run; a checkpoint every epoch."""
  return tiny_config(data, **{
      "protocol.num_classes": 8, "protocol.num_tasks": 2, "optim.batch_size": args.batch_size,
      "optim.epochs": args.epochs, "optim.learning_rate": args.learning_rate,
      "checkpoint.keep": 100, "num_devices": num_devices, "epoch_as_scan": args.epoch_as_scan})


def one_ulp(tree, seed=0):
  """Every float32 leaf moved by one ulp up or down at random: one rounding of each value."""
  leaves, treedef = jax.tree.flatten(jax.tree.map(np.asarray, tree))
  rng = np.random.default_rng(seed)
  moved = [np.nextafter(x, np.where(rng.random(x.shape) < 0.5, -np.inf, np.inf).astype(x.dtype))
           for x in leaves]
  return jax.tree.unflatten(treedef, moved)


def train(exp, config, workdir, perturb=False):
  """``trainer.run_seed``; ``perturb`` moves the initial params by one ulp. Records the devices
  every train-state leaf the epoch programs return lives on."""
  devices = set()

  def recording(fns):
    def train_epochs(*args):
      state, metrics = fns.train_epochs(*args)
      devices.update(len(x.sharding.device_set) for x in jax.tree.leaves(state))
      return state, metrics
    return fns._replace(train_epochs=train_epochs)

  def init_run(key, fresh=exp.init_run):
    run = fresh(key)
    return run.replace(train=run.train.replace(params=one_ulp(run.train.params)))

  exp = dataclasses.replace(exp, base_steps=recording(exp.base_steps),
                            incremental_steps=recording(exp.incremental_steps),
                            **({"init_run": init_run} if perturb else {}))
  exp.wait_compiled()  # the epoch programs compiled ahead of time
  with compile_events.Compilations() as compiled:
    results = trainer.run_seed(exp, config, workdir)
  if exp.compiling and any("train_epochs" in name for name in compiled.names):
    raise Mismatch("the loop compiled an epoch program that was compiled ahead of time: "
                   f"{compiled.names}")
  return results, devices


def checkpoints(workdir, exp):
  """{step: RunState} of every checkpoint in ``workdir``, on the host."""
  abstract = ckpt.abstract_like(parallel.replicate(exp.init_run(jax.random.key(0)), exp.mesh))
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state",))
  try:
    return {step: jax.tree.map(np.asarray, manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]) for step in manager.all_steps()}
  finally:
    manager.close()


def epoch_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "train/loss" in r]


def flat(tree):
  leaves = jax.tree.leaves(tree)
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in leaves]) if leaves else \
      np.zeros(0)


def compared_trees(run):
  """The float trees of a RunState compared norm-wise, by name."""
  gr = optim.reweighting_state(run.train.opt_state)
  return {"params": run.train.params, "batch_stats": run.train.batch_stats,
          "teacher_params": run.teacher_params, "teacher_batch_stats": run.teacher_batch_stats,
          "opt_state": run.train.opt_state,
          **{f"gr.{name}": getattr(gr, name) for name in gr._fields}}


class Yardstick:
  """Tolerances of 1-vs-N comparisons from what float32 reassociation can do.

  The N-device run computes every cross-batch reduction (gradients, BatchNorm moments, the
  per-class norms Φ) as per-shard partial sums plus an all-reduce: the same sums reassociated, so
  each step's reduced values differ from one device's by a few roundings, and that difference
  propagates through the rest of the run. The yardstick measures the propagation on one device:
  Δ_ulp(K) = ‖run from params moved by one ulp − run‖ after K steps, for each compared value.
  A perturbation of one rounding injected at each of K steps grows at most as the one injected at
  step 0 (the runs here amplify perturbations, they do not damp them), so the N-device difference
  is bounded by K · R · Δ_ulp(K), where R = ⌈log2(B·H·W)⌉ is the depth of the deepest reduction of
  a step (a conv kernel's gradient sums B·H·W terms; reassociating a tree of that depth moves the
  result by at most one rounding per level). A value the ulp-run leaves untouched (Δ_ulp = 0)
  still gets one rounding of itself, u‖x‖, as its Δ_ulp.

  Sanity: a data-parallel bug (a per-shard gradient or BatchNorm moment, a mean over the wrong
  count) changes every step by O(1) relative, so it moves the params by the order of their own
  change since the start; ``check_meaningful`` requires each tolerance on the params to stay below
  a tenth of that change, so such a bug cannot pass.
  """

  def __init__(self, depth: int, verbose: bool = False):
    self.depth = depth
    self.verbose = verbose
    self.worst = {}  # group -> largest difference / tolerance (pass < 1)

  def tolerance(self, steps, want, ulp_run):
    return max(steps, 1) * self.depth * max(np.linalg.norm(ulp_run - want),
                                            U * np.linalg.norm(want))

  def close(self, group, name, got, want, ulp_run, steps):
    got, want, ulp_run = (np.asarray(v, np.float64).ravel() for v in (got, want, ulp_run))
    if got.shape != want.shape:
      raise Mismatch(f"{name}: {got.size} values on N devices, {want.size} on one")
    tol = self.tolerance(steps, want, ulp_run)
    diff = np.linalg.norm(got - want)
    ratio = diff / tol if tol else float(diff > 0)
    if self.verbose:
      print(f"{name}: K={steps} diff={diff:.3g} ulp={np.linalg.norm(ulp_run - want):.3g} "
            f"diff/ulp={diff / max(np.linalg.norm(ulp_run - want), 1e-300):.3g} ratio={ratio:.3g}",
            file=sys.stderr)
    self.worst[group] = max(self.worst.get(group, 0.0), ratio)
    if ratio >= 1:
      raise Mismatch(
          f"{name} differs between 1 and N devices: ‖Δ‖ = {diff:.3g} > {steps} steps × depth "
          f"{self.depth} × ‖Δ_ulp‖ {np.linalg.norm(ulp_run - want):.3g} = {tol:.3g} "
          f"(max |Δ| {np.max(np.abs(got - want)):.3g}, ‖1-device‖ {np.linalg.norm(want):.3g})")
    return tol

  def check_meaningful(self, name, tol, update):
    self.worst["tolerance/update"] = max(self.worst.get("tolerance/update", 0.0), tol / update)
    if not tol < 0.1 * update:
      raise Mismatch(f"{name}: tolerance {tol:.3g} is not below a tenth of the params' change since "
                     f"the start ({update:.3g}); it could not see a data-parallel bug")


def equal(name, got, want):
  if not np.array_equal(np.asarray(got), np.asarray(want)):
    raise Mismatch(f"{name} differs between 1 and N devices:\n1 device: {np.asarray(want).tolist()}"
                   f"\nN devices: {np.asarray(got).tolist()}")


def compare_runs(wd1, wdp, wdn, exp1, yard: Yardstick):
  """Epoch losses and every checkpoint of the N-device run against the 1-device one."""
  losses1, lossesp, lossesn = (epoch_losses(w) for w in (wd1, wdp, wdn))
  if [(r["phase"], r["epoch"]) for r in losses1] != [(r["phase"], r["epoch"]) for r in lossesn]:
    raise Mismatch(f"different epochs logged: {len(losses1)} vs {len(lossesn)} records")
  if not any(r["phase"] > 0 and r["train/loss_kd"] > 0 for r in losses1):
    raise Mismatch("no DGR epoch with a positive KD loss: phase 1 did not distil from a teacher")
  for a, b, p in zip(lossesn, losses1, lossesp):
    for key in ("train/loss", "train/loss_ce", "train/loss_kd", "train/gr_beta",
                "train/gr_scale_min"):
      yard.close("loss", f"{key} (phase {b['phase']} epoch {b['epoch']})", a[key], b[key], p[key],
                 b["step"])
  c1, cp, cn = (checkpoints(w, exp1) for w in (wd1, wdp, wdn))
  if not sorted(c1) == sorted(cn) == sorted(cp) or len(c1) < 4:
    raise Mismatch(f"checkpoint steps differ or are too few: {sorted(c1)} vs {sorted(cn)}")
  initial = flat(exp1.init_run(jax.random.key(exp1.config.seed)).train.params)
  for step in sorted(c1):
    s1, sp, sn = c1[step], cp[step], cn[step]
    k = int(s1.train.step)
    for name in ("phase", "epoch", "key", "memory", "correct_tag", "correct_taw"):
      equal(f"checkpoint {step} {name}", getattr(sn, name), getattr(s1, name))
    equal(f"checkpoint {step} step", sn.train.step, s1.train.step)
    if int(s1.phase) == 0:  # the teacher is the initial model until phase 0 ends
      equal(f"checkpoint {step} teacher", flat(sn.teacher_params), flat(s1.teacher_params))
    trees_1, trees_p, trees_n = (compared_trees(s) for s in (s1, sp, sn))
    for name in trees_1:
      tol = yard.close(name.split(".")[0], f"checkpoint {step} {name}", flat(trees_n[name]),
                       flat(trees_1[name]), flat(trees_p[name]), k)
      if name == "params":
        yard.check_meaningful(f"checkpoint {step} params", tol,
                              np.linalg.norm(flat(s1.train.params) - initial))
  last = c1[max(c1)]
  gr = optim.reweighting_state(last.train.opt_state)
  if not (np.count_nonzero(gr.cumulative_norms) >= 8 and gr.kd_scale > 0):
    raise Mismatch(f"DGR state not exercised: Φ={gr.cumulative_norms.tolist()} β={gr.kd_scale}")
  return c1


def isolated_dgr_step(start, exp, moved=False):
  """One DGR step of phase 1 from ``start`` (its params moved by one ulp if ``moved``) on
  ``exp``'s devices, on phase data cut to one batch of B − 3 real rows (3 masked): the step sees
  the teacher, the CE and KD gradients, Φ, α, r, β and masked global BatchNorm."""
  if moved:
    start = start.replace(train=start.train.replace(params=one_ulp(start.train.params)))
  state = parallel.replicate(jax.tree.map(np.array, start), exp.mesh)  # fresh: it is donated
  data = trainer.phase_data(exp, state, 1)
  data = data._replace(size=parallel.replicate(np.int32(exp.config.optim.batch_size - 3),
                                               exp.mesh))
  key = jax.random.fold_in(jax.random.wrap_key_data(state.key), 77)[None]
  train_state, metrics = exp.incremental_steps.train_epochs(
      state.train, (state.teacher_params, state.teacher_batch_stats), data,
      trainer.constants(exp, 1), key, np.full((1,), 0.1, np.float32))
  train_state, metrics = jax.tree.map(np.asarray, (train_state, metrics))
  if int(train_state.step) != int(start.train.step) + 1 or not metrics["loss_kd"][0] > 0:
    raise Mismatch(f"isolated DGR step: expected one step with a KD loss, got step "
                   f"{train_state.step} and KD loss {metrics['loss_kd']}")
  return start.replace(train=train_state), metrics


def compare_isolated_step(start, exp1, expn, yard: Yardstick):
  """The isolated DGR step on N devices against one device, the ulp-moved one the yardstick."""
  (s1, m1), (sp, mp), (sn, mn) = (isolated_dgr_step(start, exp1), isolated_dgr_step(
      start, exp1, moved=True), isolated_dgr_step(start, expn))
  for key in ("loss", "loss_ce", "loss_kd", "gr_beta", "gr_scale_min"):
    yard.close("isolated", f"isolated DGR step {key}", mn[key], m1[key], mp[key], 1)
  trees_1, trees_p, trees_n = (compared_trees(s) for s in (s1, sp, sn))
  for name in ("params", "batch_stats", "opt_state"):
    yard.close("isolated", f"isolated DGR step {name}", flat(trees_n[name]), flat(trees_1[name]),
               flat(trees_p[name]), 1)


def check_partitioned(n, exp, results, devices):
  """The N-device run's mesh, state and compiled train programs span N devices."""
  if exp.mesh.size != n or len(results["devices"]) != n:
    raise Mismatch(f"num_devices={n}: mesh of {exp.mesh.size}, results list {results['devices']}")
  if devices != {n}:
    raise Mismatch(f"the train programs returned state on {sorted(devices)} devices, expected {n}")
  texts = [open(m).read() for m in glob.glob(os.path.join(HLO_DUMP, "*after_optimizations.txt"))]
  partitioned = [t for t in texts if re.search(rf"num_partitions={n}\b", t.split("\n", 1)[0])]
  if len(partitioned) < 2 or not all("all-reduce" in t for t in partitioned):
    raise Mismatch(f"expected the base and incremental train programs compiled for {n} partitions "
                   f"with all-reduces: {len(partitioned)} of {len(texts)} dumped modules are, "
                   f"{sum('all-reduce' in t for t in partitioned)} with all-reduces ({HLO_DUMP})")
  return len(partitioned)


def main(args):
  if len(jax.devices()) != max(args.num_devices):
    raise SystemExit(f"PARALLEL_MISMATCH expected {max(args.num_devices)} forced CPU devices, JAX "
                     f"sees {len(jax.devices())}; was jax imported before XLA_FLAGS was set?")
  n = 1
  with tempfile.TemporaryDirectory() as tmp:
    root = args.workdir or tmp
    data = args.data or write_synthetic_npz(os.path.join(tmp, "synthetic.npz"))
    try:
      config1 = make_config(data, 1, args)
      exp1 = trainer.build_experiment(config1)
      wd1, wdp = os.path.join(root, "devices_1"), os.path.join(root, "devices_1_ulp")
      train(exp1, config1, wd1)
      train(exp1, config1, wdp, perturb=True)
      size = config1.data.image_size
      depth = math.ceil(math.log2(args.batch_size * size * size))
      for n in args.num_devices:
        config = make_config(data, n, args)
        exp = trainer.build_experiment(config)
        wdn = os.path.join(root, f"devices_{n}")
        results, devices = train(exp, config, wdn)
        partitioned = check_partitioned(n, exp, results, devices)
        yard = Yardstick(depth, args.verbose)
        states1 = compare_runs(wd1, wdp, wdn, exp1, yard)
        start = states1[min(s for s, run in states1.items() if int(run.phase) == 1)]
        compare_isolated_step(start, exp1, exp, yard)
        ratios = " ".join(f"{k}={v:.3g}" for k, v in sorted(yard.worst.items()))
        print(f"PARALLEL_OK devices={n} scan={args.epoch_as_scan} lr={args.learning_rate} "
              f"partitioned_train_modules={partitioned} checkpoints={len(states1)} depth={depth} "
              f"diff/tolerance: {ratios}", flush=True)
    except Mismatch as err:
      print(f"PARALLEL_MISMATCH devices={n}: {err}", flush=True)
      return 1
  return 0


if __name__ == "__main__":
  try:
    code = main(ARGS)
  finally:
    shutil.rmtree(HLO_DUMP, ignore_errors=True)
  sys.exit(code)
