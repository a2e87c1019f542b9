"""Data parallelism: 1 device vs 4 forced CPU devices give the same GR/DGR run.

``tests/parallel_check.py`` runs in its own process, because the number of host (CPU) devices is
fixed by ``XLA_FLAGS=--xla_force_host_platform_device_count`` before JAX starts; the caller's
``XLA_FLAGS`` (``--xla_cpu_max_isa=AVX2``, say) pass through. It trains a 2-phase run (GR phase,
then a DGR phase distilling from the phase-0 teacher) on a synthetic dataset with
``config.num_devices=1`` and N, and compares losses, accuracies, params, BatchNorm statistics and
the reweighting state (Φ, α·r, β) checkpoint by checkpoint, within tolerances it derives from
float32 rounding; see its docstring. The suite runs N = 4 with epochs as one ``lax.scan`` (the
GPU path); ``python tests/parallel_check.py 2,4`` checks the CPU's loop of steps as well (about
three minutes on 2 cores), and tests/test_multihost.py runs that path on 4 devices in 1 and 2
processes.
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


@pytest.mark.parametrize("num_devices,epoch_as_scan", [((4,), "true")],
                         ids=["4_devices_epoch_scan"])
def test_n_devices_match_one_device(num_devices, epoch_as_scan):
  env = dict(os.environ)  # XLA_FLAGS pass through; the script adds the forced device count
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), ",".join(map(str, num_devices)),
       f"--epoch_as_scan={epoch_as_scan}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  summary = [l for l in proc.stdout.splitlines() if l.startswith("PARALLEL_")]
  assert proc.returncode == 0, (
      f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
  assert [l.split()[:2] for l in summary] == [["PARALLEL_OK", f"devices={n}"]
                                              for n in num_devices], proc.stdout[-4000:]
  for line in summary:
    # Every compared group reports its difference / tolerance; the partitioned steps were found.
    for group in ("loss", "params", "batch_stats", "opt_state", "gr", "isolated"):
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


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_num_devices_must_be_none_or_a_positive_integer(value):
  with pytest.raises(ValueError, match=rf"config.num_devices={value!r}: use None"):
    parallel.check_num_devices(value)


def test_num_devices_up_to_the_visible_ones_are_accepted():
  import jax  # pylint: disable=g-import-not-at-top
  for n in [None] + list(range(1, jax.device_count() + 1)):
    parallel.check_num_devices(n)
  assert parallel.make_mesh(jax.device_count()).size == jax.device_count()
