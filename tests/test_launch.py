"""launch/run.py: flag and config errors, what reaches the log, the compilation cache, the default
workdir and the final lines of a run."""

import logging as py_logging
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from processes import run_side_by_side

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "cifar100_lt.py")
# XLA:CPU compiles the tiny runs' programs about twice as fast without its costlier optimisations.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _env(xla_flags=""):
  """The caller's environment on the CPU, ``xla_flags`` added after the caller's ``$XLA_FLAGS``
  (kept: e.g. ``--xla_cpu_max_isa=AVX2``; a flag given twice takes its last value)."""
  caller = os.environ.get("XLA_FLAGS", "")
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{caller} {xla_flags}".strip())


def _launch(*args, cwd=REPO, env=None, timeout=300):
  (done,) = _launch_each([args], cwd=cwd, env=env, timeout=timeout)
  return done


def _launch_each(cases, cwd=REPO, env=None, timeout=300):
  """launch/run.py once per list of arguments in ``cases``, side by side."""
  return run_side_by_side([[sys.executable, str(REPO / "launch" / "run.py"), *args]
                           for args in cases], cwd=cwd, env=env or _env(), timeout=timeout)


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
  """4 classes of random 8×8 images (10 train, 4 test each): a whole run in seconds."""
  rng = np.random.default_rng(0)
  path = tmp_path_factory.mktemp("data") / "tiny.npz"
  y_train, y_test = np.repeat(np.arange(4), 10), np.repeat(np.arange(4), 4)
  np.savez(path, x_train=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), y_train=y_train,
           x_test=rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8), y_test=y_test)
  return path


def _tiny_run_flags(npz):
  """The smoke preset on ``tiny_npz``: one phase of 4 classes, batches of 8."""
  return [f"--config={CONFIG}:smoke", "--config.data.source=npz", f"--config.data.path={npz}",
          "--config.data.name=tiny", "--config.data.image_size=8", "--config.protocol.num_tasks=1",
          "--config.protocol.nc_first_task=4", "--config.protocol.rho=0.5",
          "--config.optim.batch_size=8", "--config.eval_chunk=8", "--config.compilation_cache_dir="]


def test_launch_points_the_compilation_cache_at_the_config_dir(tmp_path):
  """launch/run.py's cache helper: the config's directory (``~`` expanded) unless the environment
  names one, and nothing for "". Every compiled program then lands there, however quickly it
  compiled (a second run loads it; measured: BENCHMARKS.md). Runs under other ``$XLA_FLAGS`` get a
  subfolder of their own, so a deterministic-ops run never reads a default run's autotuning
  results (RESULTS.md)."""
  script = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
import jax, jax.numpy as jnp
from launch import run
caller_flags = os.environ["XLA_FLAGS"]
def cache_for(directory, xla_flags=""):
  os.environ["XLA_FLAGS"] = xla_flags
  run._use_compilation_cache(directory)
  os.environ["XLA_FLAGS"] = caller_flags
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
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # JAX's default
run._use_compilation_cache("~/xla")  # under the caller's flags, as a run gets it
assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
print(sorted(name for _, _, names in os.walk(home_xla) for name in names))
"""
  env = {k: v for k, v in _env().items() if k != "JAX_COMPILATION_CACHE_DIR"}
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        env=dict(env, HOME=str(tmp_path)), timeout=120)
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
  unknown, split, missing, budget = _launch_each([
      base + ["--config.optim.not_a_key=1"],
      base + ["--config.protocol.num_tasks=7", "--config.protocol.nc_first_task=50"],
      ["--config=configs/cifar100_lt.py:smoke", "--config.data.source=npz",
       "--config.data.path=/nonexistent/cifar.npz", f"--workdir={tmp_path}"],
      base + ["--config.memory.per_class=0"]])
  assert unknown.returncode != 0 and "not_a_key" in unknown.stderr
  assert split.returncode != 0 and "split evenly" in split.stderr
  assert missing.returncode != 0 and "/nonexistent/cifar.npz" in missing.stderr
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


def test_launch_refuses_an_unknown_override_in_one_line(tmp_path):
  workdir = tmp_path / "run"
  cases = {
      "--config.sed=3": ["--config.sed", "'sed'", 'Did you mean "seed" instead of "sed"?'],
      "--config.optim.not_a_key=1": ["--config.optim.not_a_key", "'optim.not_a_key'"],
      "--config.optm.learning_rate=1": ["'optm'", 'Did you mean "optim"'],
  }
  done = _launch_each([["--config=configs/cifar100_lt.py:smoke", override, f"--workdir={workdir}"]
                       for override in cases])
  for names, refused in zip(cases.values(), done):
    _assert_refused_in_short(refused, workdir, *names)


def test_launch_refuses_a_config_file_it_cannot_load_in_one_line(tmp_path):
  workdir = tmp_path / "run"
  missing = tmp_path / "missing.py"
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(arg=None)\n  return None\n")
  not_found = ["--config file", str(missing), "No such file"]
  cases = [([f"--config={missing}:smoke"], not_found),
           # With overrides ml_collections fails elsewhere.
           ([f"--config={missing}:smoke", "--config.seed=1"], not_found),
           ([f"--config={tmp_path}"], [str(tmp_path), "Is a directory"]),
           ([f"--config={broken}"], [str(broken), "line 1", "not valid Python"]),
           (["--config=configs/cifar100_lt.py:smok"], ["unknown config preset 'smok'", "lfs20"])]
  done = _launch_each([args + [f"--workdir={workdir}"] for args, _ in cases])
  for (_, names), refused in zip(cases, done):
    _assert_refused_in_short(refused, workdir, *names)


def test_launch_refuses_more_devices_than_visible_before_reading_data(tmp_path):
  """On the CPU the error says how to force more host devices; no data is read (the npz path does
  not exist) and no workdir is made. One host device is forced after the caller's flags."""
  workdir = tmp_path / "run"
  done = _launch("--config=configs/cifar100_lt.py:smoke", "--config.data.source=npz",
                 "--config.data.path=/nonexistent/cifar.npz", "--config.num_devices=3",
                 f"--workdir={workdir}", env=_env("--xla_force_host_platform_device_count=1"))
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
                        env=_env(), timeout=300)
  _assert_refused_in_short(done, workdir, "[tfds] extra", "pip install -e '.[tfds]'")


def test_launch_helpers_keep_the_caller_s_xla_flags(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")
  assert _env()["XLA_FLAGS"] == "--xla_cpu_max_isa=AVX2"
  assert _env(FAST_COMPILE)["XLA_FLAGS"] == f"--xla_cpu_max_isa=AVX2 {FAST_COMPILE}"


def test_launch_refuses_an_unreadable_npz_in_one_line(tmp_path):
  """Random bytes (numpy would advise the unsafe allow_pickle) and a cut archive (zipfile's
  traceback) each end the launcher with one line naming the file."""
  noise = tmp_path / "noise.npz"
  noise.write_bytes(np.random.default_rng(0).bytes(4096))
  workdir = tmp_path / "run"
  done = _launch("--config=configs/cifar100_lt.py:smoke", "--config.data.source=npz",
                 f"--config.data.path={noise}", f"--workdir={workdir}")
  _assert_refused_in_short(done, workdir, str(noise), "not a zip archive", ".npz")
  assert "allow_pickle" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_launch_refuses_an_unwritable_workdir_in_one_line(tmp_path, tiny_npz):
  """A workdir inside a file (unwritable even to root) is refused before any data is read."""
  notes = tmp_path / "notes.txt"
  notes.write_text("kept")
  done = _launch(*_tiny_run_flags(tiny_npz), f"--workdir={notes}/run")
  _assert_refused_in_short(done, notes / "run", f"{notes}/run", "--workdir=<a writable folder>")
  assert notes.read_text() == "kept" and "npz" not in done.stderr


def test_default_workdir_hashes_the_overrides_that_change_the_run():
  """The default workdir's suffix hashes the overridden entries and their parsed values: another
  setting gets another workdir (its checkpoints would be refused in the first), a setting spelt
  otherwise the same one; observation-only entries (checkpointing, devices) add none."""
  from configs import cifar100_lt  # pylint: disable=g-import-not-at-top
  from launch import run  # pylint: disable=g-import-not-at-top

  def suffix(*overrides):
    config = cifar100_lt.get_config("smoke")
    for arg in overrides:
      path, value = arg.removeprefix("--config.").split("=")
      *sections, key = path.split(".")
      target = config
      for section in sections:
        target = target[section]
      target[key] = target.get_type(key)(value)
    return run._overrides_hash(config, list(overrides))

  assert suffix() == "" and suffix("--config.checkpoint.keep=5", "--config.num_devices=1") == ""
  two = suffix("--config.seeds=0,1")
  assert re.fullmatch(r"-[0-9a-f]{8}", two), two
  assert suffix("--config.seeds=0,1,2") != two
  config = cifar100_lt.get_config("smoke")
  config.seeds = "0,1"
  assert run._overrides_hash(config, ["--config.seeds", "0,1"]) == two  # as absl also takes it
  assert suffix("--config.seed=0", "--config.optim.epochs=2") == suffix(
      "--config.optim.epochs=2", "--config.seed=0")


def test_launch_default_workdirs_of_two_settings_differ(tmp_path, tiny_npz):
  """Through the command line: with ``runs`` a file in the working directory, each run is refused
  naming the workdir it would have used."""
  (tmp_path / "runs").write_text("not a folder")
  named = []
  for done in _launch_each([_tiny_run_flags(tiny_npz) + [override]
                            for override in ("--config.seeds=0,1", "--config.seeds=0,2")],
                           cwd=tmp_path):
    assert done.returncode != 0, done.stderr
    named.append(re.search(r"workdir (runs/\S+) cannot be made", done.stderr).group(1))
  assert named[0] != named[1] and all(
      re.fullmatch(r"runs/cifar100_lt-smoke-[0-9a-f]{8}", name) for name in named), named


def test_launch_shows_jax_s_backend_probing_only_from_verbosity_1(tmp_path):
  """Without JAX_PLATFORMS JAX tries every backend and logs at INFO the ones it cannot start
  (``Unable to initialize backend 'tpu'``): not at the default verbosity, but at 1."""
  env = {k: v for k, v in _env().items() if k != "JAX_PLATFORMS"}
  workdir = tmp_path / "run"
  args = ["--config=configs/cifar100_lt.py:smoke", "--config.data.source=npz",
          "--config.data.path=/nonexistent/cifar.npz", "--config.num_devices=999",
          f"--workdir={workdir}"]
  quiet, verbose = _launch_each([args, args + ["--verbosity=1"]], env=env)
  _assert_refused_in_short(quiet, workdir, "config.num_devices=999")
  assert "tpu" not in quiet.stderr.lower(), quiet.stderr
  assert verbose.returncode != 0 and "backend 'tpu'" in verbose.stderr, verbose.stderr[-3000:]


def test_launch_ends_with_mean_and_std_over_seeds_and_a_smoke_note(tmp_path, tiny_npz):
  """A two-seed smoke run in the default workdir: its last lines give both accuracies as mean ± std
  over the 2 seeds and say that a smoke run's near-chance accuracy is expected."""
  done = _launch(*_tiny_run_flags(tiny_npz), "--config.seeds=0,1", cwd=tmp_path,
                 env=_env(FAST_COMPILE))
  assert done.returncode == 0, done.stderr[-3000:]
  *_, result, note = done.stdout.strip().splitlines()
  number = r"\d+\.\d\d ± \d+\.\d\d% \(2 seeds\)"
  assert re.fullmatch(rf"average incremental accuracy {number}  last accuracy {number}  "
                      r"\((runs/cifar100_lt-smoke-[0-9a-f]{8})/results\.json\)", result), result
  assert (tmp_path / re.search(r"\((\S+)/results", result).group(1) / "results.json").exists()
  assert note.startswith("smoke run: 1 epoch") and "drop :smoke" in note, note


def test_summary_of_one_seed_and_of_a_full_run():
  """One seed: plain percentages; a config that is not smoke-sized: no smoke note."""
  from configs import cifar100_lt  # pylint: disable=g-import-not-at-top
  from launch import run  # pylint: disable=g-import-not-at-top
  results = {"average_incremental_accuracy": 33.8214, "last_accuracy": 20.5}
  full = run._summary(results, cifar100_lt.get_config(), "runs/x")
  assert full == "average incremental accuracy 33.82%  last accuracy 20.50%  (runs/x/results.json)"
  smoke = run._summary(results, cifar100_lt.get_config("smoke"), "runs/x")
  assert smoke.startswith(full + "\nsmoke run: ")
