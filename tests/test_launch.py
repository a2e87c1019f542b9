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
  measured: BENCHMARKS.md). Runs under other ``$XLA_FLAGS`` get a subfolder of their own, so a
  deterministic-ops run never reads a default run's autotuning results (RESULTS.md)."""
  script = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
import jax, jax.numpy as jnp
from launch import run
def cache_for(directory, xla_flags=""):
  os.environ["XLA_FLAGS"] = xla_flags
  run._use_compilation_cache(directory)
  del os.environ["XLA_FLAGS"]
  return jax.config.jax_compilation_cache_dir
assert not cache_for("")
os.environ["JAX_COMPILATION_CACHE_DIR"] = "/elsewhere"
assert cache_for("~/ignored") == "/elsewhere"
det = cache_for("~/ignored", "--xla_gpu_deterministic_ops=true")
assert os.path.dirname(det) == "/elsewhere" and os.path.basename(det).startswith("xla_flags-"), det
del os.environ["JAX_COMPILATION_CACHE_DIR"]
home_xla = os.path.join({str(tmp_path)!r}, "xla")
two = "--xla_gpu_deterministic_ops=true --xla_gpu_autotune_level=0"
flagged = cache_for("~/xla", two)
assert os.path.dirname(flagged) == home_xla and flagged != det.replace("/elsewhere", home_xla)
assert cache_for("~/xla", " ".join(reversed(two.split()))) == flagged  # flag order does not matter
assert cache_for("~/xla") == home_xla
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
print(sorted(os.listdir(os.path.join({str(tmp_path)!r}, "xla"))))
"""
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        env=dict(env, JAX_PLATFORMS="cpu", HOME=str(tmp_path)), timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "-cache" in done.stdout
  from gr_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  assert config_lib.base_config().compilation_cache_dir == "~/.cache/gr_jax/xla"


def test_launch_keeps_orbax_info_and_other_packages_debug_out_of_the_log():
  """An orbax INFO record is dropped at the default verbosity (they are ~40 lines per checkpoint
  save); ``--verbosity=1`` lets it and gr_jax's own DEBUG records through but not the DEBUG records
  of other packages logging through absl (orbax: ~34,000 lines in a smoke run); ``--verbosity=2``
  lets everything through. Warnings pass always."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from launch import run  # pylint: disable=g-import-not-at-top

  def keep(path, level):
    return run._keep_log_record(py_logging.LogRecord("absl", level, path, 1, "msg", None, None))

  site = os.path.join(os.sep, "venv", "lib", "site-packages")
  orbax = os.path.join(site, "orbax", "checkpoint", "checkpoint_manager.py")
  tfds = os.path.join(site, "tensorflow_datasets", "core", "dataset_builder.py")
  ours = [str(REPO / "gr_jax" / "trainer.py"), str(REPO / "launch" / "run.py")]
  before = logging.get_verbosity()
  try:
    logging.set_verbosity(logging.INFO)
    assert not keep(orbax, py_logging.INFO)
    assert keep(orbax, py_logging.WARNING) and keep(tfds, py_logging.INFO)
    assert all(keep(path, py_logging.INFO) for path in ours)
    logging.set_verbosity(logging.DEBUG)
    assert keep(orbax, py_logging.INFO)
    assert not keep(orbax, py_logging.DEBUG) and not keep(tfds, py_logging.DEBUG)
    assert all(keep(path, py_logging.DEBUG) for path in ours)
    logging.set_verbosity(2)
    assert keep(orbax, py_logging.DEBUG) and keep(tfds, py_logging.DEBUG)
  finally:
    logging.set_verbosity(before)


def test_launch_verbosity_1_holds_jax_loggers_at_info():
  """At ``--verbosity=1`` absl lowers the root logger to DEBUG; the launcher puts it back at INFO
  and keeps absl's logger (gr_jax's) at DEBUG, so jax's loggers stay at INFO, except one given a
  level of its own (what ``JAX_DEBUG_LOG_MODULES`` / ``JAX_LOGGING_LEVEL`` do)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from launch import run  # pylint: disable=g-import-not-at-top

  root, absl_logger = py_logging.getLogger(), logging.get_absl_logger()
  asked = py_logging.getLogger("jax._src.cache_key")
  saved = (logging.get_verbosity(), root.level, absl_logger.level, asked.level)
  try:
    logging.set_verbosity(logging.DEBUG)
    root.setLevel(py_logging.DEBUG)  # what absl does when its handler is on the root logger
    asked.setLevel(py_logging.DEBUG)
    run._hold_other_loggers_at_info()
    assert py_logging.getLogger("jax._src.dispatch").getEffectiveLevel() == py_logging.INFO
    assert py_logging.getLogger("matplotlib.font_manager").getEffectiveLevel() == py_logging.INFO
    assert absl_logger.getEffectiveLevel() == py_logging.DEBUG
    assert asked.getEffectiveLevel() == py_logging.DEBUG
    root.setLevel(py_logging.DEBUG)
    logging.set_verbosity(2)  # asks for everything: nothing is held
    run._hold_other_loggers_at_info()
    assert py_logging.getLogger("jax._src.dispatch").getEffectiveLevel() < py_logging.INFO
  finally:
    logging.set_verbosity(saved[0])
    root.setLevel(saved[1])
    absl_logger.setLevel(saved[2])
    asked.setLevel(saved[3])


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
  for extra in ([], ["--config.seed=1"]):  # with overrides ml_collections fails elsewhere
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


def test_progress_bar_ends_its_line_after_a_phase_s_last_epoch(capsys):
  """After a phase's last epoch the bar ends its line, so the log lines of the phase end and of the
  next phase start lines of their own (a bar left open had them continue its line)."""
  from launch import run  # pylint: disable=g-import-not-at-top
  progress = run._Progress()
  m = {"phases": 2, "epochs": 2, "train/loss": 1.0, "train/lr": 0.1, "train/images_per_s": 10.0}
  progress({"phase": 0, "epoch": 0, **m})
  first = capsys.readouterr().err
  assert "phase 0/1" in first and not first.endswith("\n")
  progress({"phase": 0, "epoch": 1, **m})
  assert capsys.readouterr().err.endswith("\n")
  progress({"phase": 1, "epoch": 0, **m})  # a new bar for the next phase
  assert "phase 1/1" in capsys.readouterr().err
  progress.close()


def test_launch_without_the_tfds_extra_says_how_to_install_it(tmp_path):
  """The base install has neither tensorflow nor tensorflow-datasets: a tfds config ends with one
  line naming the [tfds] extra (no traceback, no workdir); npz runs need neither (CI runs the
  README's first command on the base install)."""
  workdir = tmp_path / "run"
  code = ("import runpy, sys\n"
          "sys.modules['tensorflow'] = None\n"  # any `import tensorflow` now raises ImportError
          "sys.modules['tensorflow_datasets'] = None\n"
          f"sys.argv = ['launch/run.py', '--config=configs/cifar100_lt.py:smoke', "
          f"'--workdir={workdir}']\n"
          "runpy.run_path('launch/run.py', run_name='__main__')\n")
  done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  _assert_refused_in_short(done, workdir, "[tfds] extra", "pip install -e '.[tfds]'")
