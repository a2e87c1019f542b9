"""launch/run.py: flag and config errors, what reaches the log, the compilation cache."""

import logging as py_logging
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _launch(*args, cwd=REPO, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "launch/run.py", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_launch_points_the_compilation_cache_at_the_config_dir(tmp_path):
  """launch/run.py's cache helper: the config's directory (``~`` expanded) unless the environment
  names one, and nothing for "". A compiled program then lands there (a second run would load it;
  measured: BENCHMARKS.md)."""
  script = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
import jax, jax.numpy as jnp
from launch import run
run._use_compilation_cache("")
assert not jax.config.jax_compilation_cache_dir
os.environ["JAX_COMPILATION_CACHE_DIR"] = "/elsewhere"
run._use_compilation_cache("~/ignored")
assert not jax.config.jax_compilation_cache_dir
del os.environ["JAX_COMPILATION_CACHE_DIR"]
run._use_compilation_cache("~/xla")
assert jax.config.jax_compilation_cache_dir == os.path.join({str(tmp_path)!r}, "xla")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
print(sorted(os.listdir(os.path.join({str(tmp_path)!r}, "xla"))))
"""
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        env=dict(env, JAX_PLATFORMS="cpu", HOME=str(tmp_path)), timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "-cache" in done.stdout
  from configs import common  # pylint: disable=g-import-not-at-top
  assert common.base_config().compilation_cache_dir == "~/.cache/gr_jax/xla"


def test_launch_keeps_orbax_info_out_of_the_log():
  """An orbax INFO record is dropped (they are ~40 lines per checkpoint save), its warnings and
  every gr_jax record pass, and ``--verbosity=1`` lets everything through."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from launch import run  # pylint: disable=g-import-not-at-top

  def record(path, level):
    return py_logging.LogRecord("absl", level, path, 1, "msg", None, None)

  orbax = os.path.join("site-packages", "orbax", "checkpoint", "checkpoint_manager.py")
  ours = os.path.join("gr_jax", "trainer.py")
  before = logging.get_verbosity()
  try:
    logging.set_verbosity(logging.INFO)
    assert not run._keep_log_record(record(orbax, py_logging.INFO))
    assert run._keep_log_record(record(orbax, py_logging.WARNING))
    assert run._keep_log_record(record(ours, py_logging.INFO))
    logging.set_verbosity(logging.DEBUG)
    assert run._keep_log_record(record(orbax, py_logging.INFO))
  finally:
    logging.set_verbosity(before)


def test_launch_reports_config_errors(cifar100_npz, tmp_path):
  base = ["--config=configs/cifar100_lt.py:smoke", "--config.data.source=npz",
          f"--config.data.path={cifar100_npz}", f"--workdir={tmp_path}"]
  unknown = _launch(*base, "--config.optim.not_a_key=1")
  assert unknown.returncode != 0 and "not_a_key" in unknown.stderr
  split = _launch(*base, "--config.protocol.num_tasks=7", "--config.protocol.nc_first_task=50")
  assert split.returncode != 0 and "split evenly" in split.stderr
  missing = _launch("--config=configs/cifar100_lt.py:smoke", "--config.data.source=npz",
                    "--config.data.path=/nonexistent/cifar.npz", f"--workdir={tmp_path}")
  assert missing.returncode != 0 and "/nonexistent/cifar.npz" in missing.stderr
  budget = _launch(*base, "--config.memory.per_class=0")
  assert budget.returncode != 0 and "positive integer" in budget.stderr


def _assert_refused_in_short(done, workdir, *names):
  """Status != 0, at most two stderr lines starting ``error:``, no traceback, each of ``names`` in
  it, and no workdir made."""
  lines = done.stderr.strip().splitlines()
  assert done.returncode != 0, done.stderr
  assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), done.stderr[-3000:]
  assert "Traceback" not in done.stderr
  for name in names:
    assert name in done.stderr, (name, done.stderr)
  assert not workdir.exists()


@pytest.mark.parametrize("override,names", [
    ("--config.sed=3", ["--config.sed", "'sed'", 'Did you mean "seed" instead of "sed"?']),
    ("--config.optim.not_a_key=1", ["--config.optim.not_a_key", "'optim.not_a_key'"]),
    ("--config.optm.learning_rate=1", ["'optm'", 'Did you mean "optim"']),
])
def test_launch_refuses_an_unknown_override_in_one_line(tmp_path, override, names):
  workdir = tmp_path / "run"
  done = _launch("--config=configs/cifar100_lt.py:smoke", override, f"--workdir={workdir}")
  _assert_refused_in_short(done, workdir, *names)


def test_launch_refuses_a_config_file_it_cannot_load_in_one_line(tmp_path):
  workdir = tmp_path / "run"
  missing = tmp_path / "missing.py"
  for extra in ([], ["--config.seed=1"]):  # ml_collections fails at a different point with overrides
    done = _launch(f"--config={missing}:smoke", *extra, f"--workdir={workdir}")
    _assert_refused_in_short(done, workdir, "--config file", str(missing), "No such file")
  done = _launch(f"--config={tmp_path}", f"--workdir={workdir}")
  _assert_refused_in_short(done, workdir, str(tmp_path), "Is a directory")
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(arg=None)\n  return None\n")
  done = _launch(f"--config={broken}", f"--workdir={workdir}")
  _assert_refused_in_short(done, workdir, str(broken), "line 1", "not valid Python")
  done = _launch("--config=configs/cifar100_lt.py:smok", f"--workdir={workdir}")
  _assert_refused_in_short(done, workdir, "unknown config preset 'smok'", "lfs20")


def test_launch_refuses_more_devices_than_visible_before_reading_data(tmp_path):
  """On the CPU the error says how to force more host devices; no data is read (the npz path does
  not exist) and no workdir is made."""
  workdir = tmp_path / "run"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  done = subprocess.run(
      [sys.executable, "launch/run.py", "--config=configs/cifar100_lt.py:smoke",
       "--config.data.source=npz", "--config.data.path=/nonexistent/cifar.npz",
       "--config.num_devices=3", f"--workdir={workdir}"],
      cwd=REPO, env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
  _assert_refused_in_short(done, workdir, "config.num_devices=3, but 1 cpu device is visible",
                           "XLA_FLAGS=--xla_force_host_platform_device_count=3")
