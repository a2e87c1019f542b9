r"""Runs one gr_jax experiment: ``python launch/run.py --config=configs/cifar100_lt.py[:presets]``.

Flags: ``--config.<key>=<value>`` overrides any config entry; ``--workdir`` receives checkpoints,
results.json, metrics.jsonl, TensorBoard events and accuracy.png. Rerunning with the same workdir
resumes from the latest checkpoint. The default workdir is ``runs/<config name>-<presets>``, plus
``-<8 hex digits>`` when ``--config.*`` overrides change what the run computes (a hash of those
entries and their values), so runs of one preset under other settings get workdirs of their own;
overrides of how a run is observed, resumed or spread over devices (``gr_jax.config.
OBSERVATION_KEYS``: ``checkpoint``, ``num_devices``, ``epochs_per_call``, ...) keep the workdir,
so such a run still resumes. SIGTERM / SIGINT save a checkpoint and stop the run (status 128 + the
signal's number); the same command resumes it.
"""

import hashlib
import logging as py_logging
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import tqdm

from gr_jax import config as config_lib
from gr_jax import trainer
from gr_jax.data import sources

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file[:presets].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (default: runs/<config>-<presets>[-<hash of the --config.* "
    "overrides>]; see the module docstring).")
flags.mark_flags_as_required(["config"])


def _override_paths(argv: list[str]) -> list[str]:
  """The entries that ``--config.<entry>=...`` arguments override, as ml_collections finds them."""
  return [arg.split("=", 1)[0].split(".", 1)[1] for arg in argv
          if re.match(r"-{1,2}(no)?config\.", arg)]


def _unknown_entry(err: Exception, argv: list[str]) -> str | None:
  """``--config.optim.lr=...: no config entry 'optim.lr'. Did you mean ...?`` for the KeyError /
  AttributeError ml_collections raises on an unknown override; None when no override names the key
  (then the error is not about the command line)."""
  message = err
  while isinstance(message, BaseException) and message.args:  # AttributeError(KeyError(str))
    message = message.args[0]
  key, _, hint = str(message).partition("\n")
  key = key.strip("'\"")
  for path in _override_paths(argv):
    parts = path.split(".")
    if key in parts:
      entry = ".".join(parts[:parts.index(key) + 1])
      return (f"--config.{path}: no config entry {entry!r} (gr_jax/config.py lists them)"
              + (f". {hint.strip()}" if hint.strip() else ""))
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, but a bad flag ends the program with one ``error: ...`` line (two at most)
  and status 1 instead of ml_collections' chained tracebacks.

  Covers an unknown ``--config.<entry>`` (ml_collections' "Did you mean" hint kept), a ``--config``
  file that cannot be read or whose ``get_config`` refuses its presets, and absl's own flag errors.
  It runs before ``main``, so a refused command touches no workdir.
  """
  try:
    rest = flags.FLAGS(argv)
    if not isinstance(_CONFIG.value, ml_collections.ConfigDict):
      # ml_collections keeps a file it could not read as a stand-in that raises its OSError on use.
      _CONFIG.value.get("seed")
    return rest
  except flags.Error as err:
    message = str(err)
    head, found, trace = message.partition(": Error whilst parsing config file:")
    if found:  # get_config raised; its traceback is in the message, its last line says why
      last = trace.strip().splitlines()[-1]
      message = f"{head}: {re.sub(r'^[A-Za-z_.]*(Error|Exception): ', '', last)}"
  except SyntaxError as err:
    message = f"the --config file {err.filename}, line {err.lineno}, is not valid Python: {err.msg}"
  except OSError as err:
    last = str(err.__cause__ or err).strip().splitlines()[-1].strip()
    message = (f"cannot read the --config file: {last}; give a config file and optional presets, "
               "e.g. --config=configs/cifar100_lt.py:smoke")
  except (AttributeError, KeyError) as err:
    message = _unknown_entry(err, argv)
    if message is None:
      raise
  sys.exit(f"error: {message}")


class _Progress:
  """One tqdm bar per phase, advanced by the trainer's per-epoch hook.

  Phases count from 0 (the base phase) to T-1, as in the logs, metrics.jsonl and results.json. A
  bar closes (ends its line) after its phase's last epoch, so the log lines of the phase end and of
  the next phase start on lines of their own.
  """

  def __init__(self):
    self._bar = None
    self._phase = None

  def __call__(self, m):
    if self._bar is None or m["phase"] != self._phase:  # a new phase, or a new seed's first
      self.close()
      self._phase = m["phase"]
      self._bar = tqdm.tqdm(total=m["epochs"], initial=m["epoch"], unit="epoch",
                            desc=f"phase {m['phase']}/{m['phases'] - 1}", dynamic_ncols=True)
    self._bar.set_postfix(loss=f"{m['train/loss']:.3f}", lr=m["train/lr"],
                          img_s=f"{m['train/images_per_s']:.0f}")
    self._bar.update(1)
    if m["epoch"] + 1 == m["epochs"]:
      self.close()

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None


def _overrides_hash(config: ml_collections.ConfigDict, argv: list[str]) -> str:
  """``-<8 hex digits>`` of a sha256 of the entries that ``--config.*`` arguments in ``argv``
  override, with their values in ``config`` (as parsed, so two spellings of one setting agree);
  "" when there are none. Entries in ``config.OBSERVATION_KEYS`` are left out: they do not change
  the run."""
  settings = []
  for path in sorted(set(_override_paths(argv))):
    if path.split(".")[0] in config_lib.OBSERVATION_KEYS:
      continue
    value = config
    for key in path.split("."):
      value = value[key]
    settings.append(f"{path}={value!r}")
  return "-" + hashlib.sha256("\n".join(settings).encode()).hexdigest()[:8] if settings else ""


def _default_workdir(argv: list[str]) -> str:
  """runs/<config file stem>[-<presets>][-<overrides hash>], e.g. runs/cifar100_lt-lfs20-1a2b3c4d."""
  flag = flags.FLAGS["config"]
  stem = os.path.splitext(os.path.basename(config_flags.get_config_filename(flag)))[0]
  presets = flag.serialize().partition(":")[2]
  return os.path.join("runs", stem + (f"-{presets.replace(',', '-')}" if presets else "")
                      + _overrides_hash(_CONFIG.value, argv))


def _use_compilation_cache(directory: str) -> None:
  """Points JAX's persistent compilation cache at ``directory`` (the environment's
  ``JAX_COMPILATION_CACHE_DIR`` first), in a subfolder of its own per ``$XLA_FLAGS``.

  A run compiles two epoch programs plus evaluation and herding (about 40 s on an H100); the cache
  lets the next run of the same config, another seed included, load them instead. JAX keys its
  programs by the flags but keeps XLA's per-fusion autotuning results beside them, keyed by fusion
  only: a run under ``--xla_gpu_deterministic_ops=true`` (which turns autotuning off) that shares
  the folder with a run without it picks up that run's kernel choices, and then loses
  run-to-run determinism or fails to compile (measured: RESULTS.md, "XLA's deterministic GPU ops").
  So runs under other flags get another folder.

  Every program is kept, not only those over JAX's default second of compile time: a run also
  compiles dozens of small ones (phase ends, herding per class size, fresh heads), and loading them
  made a warm smoke run compile 0.8 s in its loop instead of 4.7 s (BENCHMARKS.md).
  """
  base = os.environ.get("JAX_COMPILATION_CACHE_DIR") or directory
  if not base:
    return
  xla_flags = " ".join(sorted(os.environ.get("XLA_FLAGS", "").split()))
  if xla_flags:
    base = os.path.join(base, "xla_flags-" + hashlib.sha256(xla_flags.encode()).hexdigest()[:12])
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(base))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


# Where this program's own log records come from: the library, the launcher and the configs.
_LAUNCH_DIR = os.path.dirname(os.path.abspath(__file__))
_OWN_CODE = (os.path.dirname(os.path.abspath(trainer.__file__)) + os.sep, _LAUNCH_DIR + os.sep,
             os.path.join(os.path.dirname(_LAUNCH_DIR), "configs") + os.sep)


def _info_from_verbosity_1(record: py_logging.LogRecord) -> bool:
  """Other packages' INFO that shows only from ``--verbosity=1``: orbax's (about 40 lines per
  checkpoint save; it logs through absl, so it is known by its file) and JAX's (its own loggers;
  chiefly ``Unable to initialize backend 'tpu'`` at the start of every run on a machine without
  one)."""
  return f"{os.sep}orbax{os.sep}" in record.pathname or record.name.split(".")[0] == "jax"


def _keep_log_record(record: py_logging.LogRecord) -> bool:
  """What reaches the terminal: warnings and errors always, and gr_jax's own records at the
  ``--verbosity`` asked for. Other packages' DEBUG records (orbax and tfds log through absl) are cut
  unless ``--verbosity=2`` (JAX's, when asked for with ``JAX_LOGGING_LEVEL``, print through JAX's
  own handler), and orbax's and JAX's INFO show from ``--verbosity=1``."""
  verbosity = logging.get_verbosity()
  if (record.levelno >= py_logging.WARNING or verbosity > logging.DEBUG
      or record.pathname.startswith(_OWN_CODE)):
    return True
  if record.levelno < py_logging.INFO:
    return False
  return verbosity >= logging.DEBUG or not _info_from_verbosity_1(record)


def _hold_other_loggers_at_info() -> None:
  """At ``--verbosity=1`` absl lowers the root logger to DEBUG, and every Python logger that has no
  level of its own (jax's, matplotlib's, asyncio's: tens of thousands of lines a run) follows it.
  Keep the root at INFO and only absl's logger, which gr_jax logs through, at DEBUG. JAX's own
  ``JAX_LOGGING_LEVEL`` / ``JAX_DEBUG_LOG_MODULES`` set its loggers' levels and still apply;
  ``--verbosity=2`` leaves everything at DEBUG."""
  if logging.get_verbosity() == logging.DEBUG:
    logging.get_absl_logger().setLevel(py_logging.DEBUG)
    py_logging.getLogger().setLevel(py_logging.INFO)


def _summary(results: dict, config: ml_collections.ConfigDict, workdir: str) -> str:
  """The run's final terminal lines: its two accuracies (mean ± std over several seeds), where the
  results are, and for a smoke run why its numbers are low."""
  seeds = len(results.get("per_seed") or ()) or 1

  def accuracy(key):
    if seeds == 1:
      return f"{results[key]:.2f}%"
    return f"{results[key]:.2f} ± {results[key + '_std']:.2f}% ({seeds} seeds)"

  line = (f"average incremental accuracy {accuracy('average_incremental_accuracy')}  "
          f"last accuracy {accuracy('last_accuracy')}  ({workdir}/results.json)")
  if config.optim.epochs == 1 and config.protocol.max_train_per_class is not None:  # :smoke
    line += (f"\nsmoke run: 1 epoch on at most {config.protocol.max_train_per_class} images of "
             "each class, so near-chance accuracy and a climbing loss are expected; drop :smoke "
             "for the real protocol")
  return line


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_keep_log_record)
  _hold_other_loggers_at_info()
  workdir = _WORKDIR.value or _default_workdir(sys.argv[1:])
  _use_compilation_cache(_CONFIG.value.compilation_cache_dir)
  progress = _Progress()
  try:
    results = trainer.run(_CONFIG.value, workdir, on_epoch=progress)
  except (ValueError, FileNotFoundError, FloatingPointError, sources.MissingExtraError) as err:
    # Input, installation and numerical errors: the message says what to fix; no traceback needed.
    raise SystemExit(f"error: {err}") from None
  except trainer.Stopped as stop:  # a preemption: saved, and resumable
    progress.close()
    print(stop, file=sys.stderr)
    sys.exit(128 + stop.signum)
  finally:
    progress.close()
  logging.info("results in %s", os.path.join(workdir, "results.json"))
  print(_summary(results, _CONFIG.value, workdir))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
