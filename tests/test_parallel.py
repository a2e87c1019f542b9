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


def test_more_devices_than_visible_on_cpu_names_the_forced_device_count():
  """On the CPU the fix is XLA_FLAGS=--xla_force_host_platform_device_count=N (set before JAX
  starts); N is the number asked for."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "cpu":
    pytest.skip("the CPU hint; the GPU message is tested with stand-in devices below")
  n = jax.device_count() + 1
  with pytest.raises(ValueError, match=rf"config.num_devices={n}, but {n - 1} cpu device.* "
                                       rf"XLA_FLAGS=--xla_force_host_platform_device_count={n}"):
    parallel.make_mesh(n)


def test_more_devices_than_visible_on_gpu_says_how_many_are_visible(monkeypatch):
  class Gpu:  # a stand-in for a jax GPU device: its platform and its name
    platform = "gpu"

    def __init__(self, i):
      self.i = i

    def __str__(self):
      return f"cuda:{self.i}"

  monkeypatch.setattr(parallel.jax, "devices", lambda: [Gpu(0), Gpu(1)])
  with pytest.raises(ValueError, match=r"config.num_devices=4, but 2 gpu devices are visible "
                                       r"\(cuda:0, cuda:1\): use at most 2") as err:
    parallel.check_num_devices(4)
  assert "xla_force_host" not in str(err.value)


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_num_devices_must_be_zero_or_a_positive_integer(value):
  with pytest.raises(ValueError, match=rf"config.num_devices={value!r}: use 0"):
    parallel.check_num_devices(value)


def test_num_devices_up_to_the_visible_ones_are_accepted():
  import jax  # pylint: disable=g-import-not-at-top
  for n in range(jax.device_count() + 1):
    parallel.check_num_devices(n)
  assert parallel.make_mesh(jax.device_count()).size == jax.device_count()
