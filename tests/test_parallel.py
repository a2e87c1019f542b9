"""Data parallelism: 1 device vs 2, 4 and 8 forced CPU devices give the same DGR run.

Each case runs ``tests/parallel_check.py`` in its own process, because the number of host (CPU)
devices is fixed by ``XLA_FLAGS=--xla_force_host_platform_device_count`` before JAX starts; the
4- and 8-device runs share one process (8 forced devices) and its 1-device reference run. The
script trains the same 2-phase run (GR phase, then a DGR phase distilling from the phase-0 teacher)
with ``config.num_devices=1`` and ``=N`` and compares losses, accuracies, params, BatchNorm
statistics and the reweighting state (Φ, α·r, β) checkpoint by checkpoint; see its docstring.
On 2 CPU cores the N = 2 case (epochs as ``lax.scan``, the GPU path) takes about 70 s, the 4- and
8-device case about 100 s.
"""

import os
import pathlib
import re
import subprocess
import sys
import types

import pytest

from gr_jax import parallel

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "parallel_check.py"


@pytest.mark.parametrize("num_devices,epoch_as_scan", [((2,), "true"), ((4, 8), "false")],
                         ids=["2_devices_epoch_scan", "4_and_8_devices"])
def test_n_devices_match_one_device(cifar100_npz, num_devices, epoch_as_scan):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # the script sets the forced device count itself
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), ",".join(map(str, num_devices)), f"--data={cifar100_npz}",
       f"--epoch_as_scan={epoch_as_scan}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
  summary = [l for l in proc.stdout.splitlines() if l.startswith("PARALLEL_")]
  assert proc.returncode == 0, (
      f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
  assert [l.split()[1] for l in summary] == [f"devices={n}" for n in num_devices], (
      proc.stdout[-4000:])
  for line in summary:
    assert line.startswith("PARALLEL_OK "), line
    # Every compared group reports its largest difference, the partitioned steps were found.
    for group in ("loss", "params", "batch_stats", "gr_state", "isolated", "params_p1"):
      assert re.search(rf"\b{group}=[0-9.e+-]+", line), line
    assert int(re.search(r"partitioned_train_modules=(\d+)", line).group(1)) >= 2
    print(line)


@pytest.mark.parametrize("batch_size,size", [(16, 3), (10, 4), (1, 2)])
def test_indivisible_batch_is_refused(batch_size, size):
  with pytest.raises(ValueError, match=f"batch size {batch_size} does not split over {size} "
                                       f"devices; use a multiple of {size}"):
    parallel.check_batch(batch_size, types.SimpleNamespace(size=size))


@pytest.mark.parametrize("batch_size,size", [(16, 1), (16, 2), (16, 8), (24, 4)])
def test_divisible_batch_is_accepted(batch_size, size):
  parallel.check_batch(batch_size, types.SimpleNamespace(size=size))


def test_multi_host_env_without_process_count_is_a_clear_error(monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
  monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
  monkeypatch.setenv("JAX_PROCESS_ID", "0")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
    parallel.initialize_distributed()
