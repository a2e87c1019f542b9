"""launch/bench.py on CPU: the JSON record, its step kinds, and flag errors."""

import json
import os
import sys

from processes import run_side_by_side

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(*cases):
  """launch/bench.py on the smoke config in batches of 8, once per case of extra arguments (XLA:CPU
  runs the convolutions of a scanned epoch slowly: a step of 128 images takes ~10 s on 2 cores)."""
  base = [sys.executable, os.path.join(ROOT, "launch", "bench.py"),
          "--config=" + os.path.join(ROOT, "configs", "cifar100_lt.py") + ":smoke",
          "--config.optim.batch_size=8", "--steps=2", "--epochs=1"]
  return run_side_by_side([base + list(args) for args in cases], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", GR_JAX_COMMIT="abc1234"))


def test_bench_writes_a_record_with_throughput(tmp_path):
  out = tmp_path / "bench.json"
  (done,) = _bench(["--variants=plain", "--real_steps=1", f"--out={out}"])
  assert done.returncode == 0, done.stderr[-2000:]
  record = json.loads(out.read_text())
  assert record["commit"] == "abc1234" and record["model"] == "resnet8"
  # One of the two scanned steps holds data; the other is padding that the epoch skips.
  assert record["steps_per_epoch"] == 2 and record["real_steps_per_epoch"] == 1
  plain = record["steps"]["plain"]
  assert set(record["steps"]) == {"plain"} and plain["images_per_s"] > 0
  assert plain["images_per_s"] >= plain["images_per_s_mean"] > 0


def test_bench_flag_errors(tmp_path):
  out = f"--out={tmp_path / 'x.json'}"
  unknown, untimed, too_many = _bench(["--variants=plain,fast", out],
                                      ["--variants=plain", "--profile=dgr", out],
                                      ["--variants=plain", "--real_steps=3", out])
  assert unknown.returncode != 0 and "unknown step kinds ['fast']" in unknown.stderr
  assert untimed.returncode != 0 and "add them to --variants" in untimed.stderr
  assert too_many.returncode != 0 and "--real_steps=3 must be between 1 and --steps=2" in (
      too_many.stderr)
