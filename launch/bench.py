r"""Throughput and protocol-time benchmark: ``python launch/bench.py --config=configs/cifar100_lt.py``.

Measures, on the current device, images/s of the training step for: the plain CE step (no
reweighting, no prior), the GR step (phase 0), the plain step with a teacher and KD (phase >= 1)
and the DGR step with teacher (phase >= 1); the overhead ratios; compile time; peak device memory.
With ``--protocol`` it also runs the config's whole protocol through the trainer and records its
wall time. Writes one JSON record (``--out``) with the device name, date and git commit.
``--profile=dgr`` traces that step kind with the JAX profiler and records its GPU kernel time by
category (convolutions, reductions, elementwise fusions, copies) and how busy the GPU stream was.
"""

import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from gr_jax import provenance
from gr_jax import state as state_lib
from gr_jax import steps
from gr_jax import trainer
from gr_jax.data import augment
from gr_jax.phase_constants import phase_constants
from launch import trace_summary

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:presets].")
_OUT = flags.DEFINE_string("out", "bench.json", "Where to write the JSON record.")
_STEPS = flags.DEFINE_integer("steps", 40, "Steps per timed epoch (the compiled scan length).")
_REAL_STEPS = flags.DEFINE_integer(
    "real_steps", None, "Steps of each epoch that hold data (default: all). The rest are padding "
    "that lax.cond skips, as in the protocol's phases smaller than the largest one.")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Timed epochs per variant (after one warm-up).")
_PROTOCOL = flags.DEFINE_bool("protocol", False, "Also time the config's whole protocol.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/bench", "Workdir of the protocol run.")
_VARIANTS = flags.DEFINE_list("variants", ["plain", "gr", "plain_teacher", "dgr"],
                              "Step kinds to time.")
_PROFILE = flags.DEFINE_list("profile", [], "Step kinds to trace with the JAX profiler; their GPU "
                             "kernel time by category goes into the record.")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", "runs/profile", "Where the traces go.")
flags.mark_flags_as_required(["config"])

VARIANTS = {
    # name: (config.method entries, incremental phase)
    "plain": (dict(reweighting="none", kd="none", logit_prior=False), False),
    "gr": (dict(reweighting="dgr", kd="none", logit_prior=True), False),
    "plain_teacher": (dict(reweighting="none", kd="plain", logit_prior=False), True),
    "dgr": (dict(reweighting="dgr", kd="dakd", logit_prior=True), True),
}


def _real_steps() -> int:
  """Steps of each timed epoch that hold data (``--real_steps``, default all ``--steps``)."""
  return _STEPS.value if _REAL_STEPS.value is None else _REAL_STEPS.value


def time_variant(config, name: str, profile_dir: str | None = None) -> dict:
  """images/s of one step kind on synthetic uint8 data resident on the device.

  With ``profile_dir``, one more epoch runs under the JAX profiler (a perfetto trace there).
  """
  method_entries, incremental = VARIANTS[name]
  config = config.copy_and_resolve_references()
  config.method.update(method_entries)
  method = steps.Method.from_config(config)
  num_classes, batch = 100, config.optim.batch_size
  size = config.data.image_size
  model, tx = trainer.model_and_optimizer(config, num_classes)
  train_aug, test_aug = augment.get_augmentation(config.augment, size)
  capacity = batch * _STEPS.value
  real = batch * _real_steps()
  fns = steps.make_step_fns(model, tx, method, train_aug, test_aug, batch_size=batch,
                            num_steps=_STEPS.value, incremental=incremental, epoch_as_scan=True)
  counts = np.concatenate([np.full(50, 500), np.full(50, 100)])
  consts = phase_constants(counts, 50 if incremental else 0, 5 if incremental else 50, 20)
  run = jax.jit(lambda k: state_lib.create_run_state(
      model, tx, k, (size, size, 3), 2, num_classes, 20))(jax.random.key(0))
  rng = np.random.default_rng(0)
  high = 55 if incremental else 50
  data = steps.PhaseData(
      jnp.asarray(rng.integers(0, 256, (capacity, size, size, 3), np.uint8)),
      jnp.asarray(rng.integers(0, high, (capacity,), np.int32)), jnp.int32(real))
  teacher = (run.teacher_params, run.teacher_batch_stats)
  carry = run.train
  tic = time.perf_counter()
  epoch_keys, lrs = jax.random.split(jax.random.key(1), 1), jnp.full((1,), 0.1, jnp.float32)
  carry, m = fns.train_epochs(carry, teacher, data, consts, epoch_keys, lrs)
  jax.block_until_ready(m)
  compile_and_first = time.perf_counter() - tic
  times = []
  for _ in range(_EPOCHS.value):
    tic = time.perf_counter()
    carry, m = fns.train_epochs(carry, teacher, data, consts, epoch_keys, lrs)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - tic)
  if profile_dir:
    jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
    carry, m = fns.train_epochs(carry, teacher, data, consts, epoch_keys, lrs)
    jax.block_until_ready(m)
    jax.profiler.stop_trace()
  best = min(times)
  return {"images_per_s": real / best,
          "images_per_s_mean": real * len(times) / sum(times), "epoch_s": best,
          "compile_and_first_epoch_s": compile_and_first,
          "loss": float(np.mean(m["loss"]))}


def main(argv):
  del argv
  config = _CONFIG.value
  device = jax.devices()[0]
  record = {"device": device.device_kind, "platform": device.platform,
            "num_devices": jax.device_count(), "jax": jax.__version__,
            "date": datetime.date.today().isoformat(), "commit": provenance.commit(),
            "model": config.model, "image_size": config.data.image_size,
            "batch_size": config.optim.batch_size, "dtype": config.dtype,
            "steps_per_epoch": _STEPS.value,
            "real_steps_per_epoch": _real_steps(), "steps": {}}
  unknown = set(_VARIANTS.value + _PROFILE.value) - set(VARIANTS)
  if unknown:
    raise app.UsageError(f"unknown step kinds {sorted(unknown)}; choose from {list(VARIANTS)}")
  if _REAL_STEPS.value is not None and not 1 <= _REAL_STEPS.value <= _STEPS.value:
    raise app.UsageError(f"--real_steps={_REAL_STEPS.value} must be between 1 and --steps="
                         f"{_STEPS.value}")
  if set(_PROFILE.value) - set(_VARIANTS.value):
    raise app.UsageError(f"--profile={_PROFILE.value} names step kinds that --variants does not "
                         "time; add them to --variants")
  for name in _VARIANTS.value:
    profile_dir = None
    if name in _PROFILE.value:
      profile_dir = os.path.join(_PROFILE_DIR.value, name)
    record["steps"][name] = time_variant(config, name, profile_dir)
    if profile_dir and device.platform == "gpu":
      record["steps"][name]["profile"] = trace_summary.summarize(profile_dir, _real_steps())
      print(trace_summary.format_summary(record["steps"][name]["profile"]), flush=True)
    elif profile_dir:  # the summary reads GPU kernels; other platforms keep the raw trace
      record["steps"][name]["profile_dir"] = profile_dir
    print(name, json.dumps({k: v for k, v in record["steps"][name].items() if k != "profile"}),
          flush=True)
  s = record["steps"]
  if "plain" in s and "gr" in s:
    record["overhead_gr_vs_plain"] = s["plain"]["images_per_s"] / s["gr"]["images_per_s"] - 1
  if "plain_teacher" in s and "dgr" in s:
    record["overhead_dgr_vs_plain_teacher"] = (
        s["plain_teacher"]["images_per_s"] / s["dgr"]["images_per_s"] - 1)
  stats = device.memory_stats() or {}
  record["peak_memory_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30
  if _PROTOCOL.value:
    tic = time.perf_counter()
    results = trainer.run(config, _WORKDIR.value)
    record["protocol"] = {
        "wall_time_s": time.perf_counter() - tic, "seeds": results["seeds"],
        "average_incremental_accuracy": results["average_incremental_accuracy"],
        "last_accuracy": results["last_accuracy"], "workdir": _WORKDIR.value}
    record["peak_memory_gib"] = (device.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30
  with open(_OUT.value, "w") as f:
    json.dump(record, f, indent=2)
  print(json.dumps(record, indent=2))


if __name__ == "__main__":
  app.run(main)
