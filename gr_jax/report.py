"""Run outputs: per-step scalars (JSON lines + TensorBoard), final results JSON and a summary plot.

Pure host-side I/O. TensorBoard event files are written with tensorboard's TF-free record writer
(``tensorboard.summary.writer.record_writer`` + the ``tensorboard.compat.proto`` protos), because
tensorboard's ``EventFileWriter`` goes through ``tf.io.gfile`` and so imports TensorFlow whenever it
is installed — slow, and unwanted next to JAX on an accelerator.

Layout of a work directory::

  workdir/metrics.jsonl                    one JSON object per write_scalars call
  workdir/tensorboard/events.out.tfevents.gr_jax   TensorBoard scalars
  workdir/results.json                     final metrics (write_results)
  workdir/accuracy.png                     summary plot (plot_results)
"""
from __future__ import annotations

import json
import os
import secrets
import struct
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from gr_jax import config as config_lib
from gr_jax import metrics

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
# One fixed name (it must contain 'tfevents' for TensorBoard to find it) so that a resumed run
# appends to the same file. TensorBoard discards points beyond a step that goes backwards, which
# is exactly what a restart from an earlier checkpoint needs.
EVENTS_FILE = 'events.out.tfevents.gr_jax'
RESULTS_FILE = 'results.json'
PLOT_FILE = 'accuracy.png'


def _valid_records_end(path: str) -> int:
  """Byte offset just past the last complete TFRecord in ``path`` (a crash may leave a torn one)."""
  end = 0
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    while True:
      header = f.read(12)  # uint64 length + uint32 masked crc of the length
      if len(header) < 12:
        return end
      (length,) = struct.unpack('<Q', header[:8])
      record_end = end + 12 + length + 4
      if record_end > size:
        return end
      f.seek(record_end)
      end = record_end


class MetricWriter:
  """Writes scalars to ``workdir/metrics.jsonl`` and to TensorBoard events in ``workdir/tensorboard``.

  Both files are opened in append mode, so a resumed run continues them, and every record is
  flushed as it is written, so both can be followed while the run goes and survive a kill. A run
  resumed from a checkpoint at global step ``s`` passes ``resume_step=s``: records after ``s``
  (written by the killed run after its last checkpoint, and about to be written again) are dropped
  from ``metrics.jsonl``, and a ``SessionLog.START`` event at ``s + 1`` makes TensorBoard purge them
  from its view. Use as a context manager or call ``close()``.

  Example::

    with MetricWriter(workdir) as w:
      w.write_scalars(step, {'train/loss': 0.7, 'lr': 0.1}, phase=0, epoch=3)
  """

  def __init__(self, workdir: str | os.PathLike, resume_step: int | None = None):
    self.workdir = os.fspath(workdir)
    tb_dir = os.path.join(self.workdir, TENSORBOARD_DIR)
    os.makedirs(tb_dir, exist_ok=True)

    jsonl_path = os.path.join(self.workdir, METRICS_FILE)
    if resume_step is not None and os.path.exists(jsonl_path):
      _drop_records_after(jsonl_path, resume_step)
    self._jsonl = open(jsonl_path, 'a', encoding='utf-8')
    if self._jsonl.tell() > 0 and not _ends_with_newline(jsonl_path):
      self._jsonl.write('\n')  # finish a line torn by a crash so the next one parses

    events_path = os.path.join(tb_dir, EVENTS_FILE)
    is_new = not os.path.exists(events_path)
    if not is_new:
      end = _valid_records_end(events_path)
      if end < os.path.getsize(events_path):
        os.truncate(events_path, end)
    self._events = RecordWriter(open(events_path, 'ab'))
    if is_new:
      self._write_event(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))
    elif resume_step is not None:
      self._write_event(event_pb2.Event(
          wall_time=time.time(), step=resume_step + 1,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    self.flush()

  def _write_event(self, event: event_pb2.Event):
    self._events.write(event.SerializeToString())

  def write_scalars(self, step: int, scalars: Mapping[str, Any], **context: Any):
    """Records ``scalars`` at global ``step``.

    Args:
      step: global step (TensorBoard x-axis).
      scalars: name -> number (Python, numpy or JAX scalar); names are TensorBoard tags.
      **context: extra JSON-only fields such as ``phase`` and ``epoch``.
    """
    step = int(step)
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    record = metrics.to_json_compatible({**context, 'step': step, **values})
    self._jsonl.write(json.dumps(record, allow_nan=False) + '\n')
    summary = summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
    self._write_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
    self.flush()

  def flush(self):
    self._jsonl.flush()
    self._events.flush()

  def close(self):
    if not self._jsonl.closed:
      self.flush()
      self._jsonl.close()
    if not self._events.closed:
      self._events.close()

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info):
    self.close()


class NullWriter:
  """A :class:`MetricWriter` that writes nothing (processes other than the first of a run)."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any], **context: Any):
    del step, scalars, context

  def flush(self):
    pass

  def close(self):
    pass

  def __enter__(self) -> NullWriter:
    return self

  def __exit__(self, *exc_info):
    self.close()


def _drop_records_after(path: str, step: int):
  """Rewrites the JSON-lines file ``path`` without its records whose ``step`` is after ``step``
  (a torn last line goes too)."""
  kept = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if record.get('step', 0) <= step:
        kept.append(line if line.endswith('\n') else line + '\n')
  atomic_write(path, lambda f: f.writelines(kept))


def _ends_with_newline(path: str) -> bool:
  with open(path, 'rb') as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b'\n'


def atomic_write(path: str, write_fn, mode: str = 'w'):
  """Writes via a temporary file in the same directory + ``os.replace``: never a half file, and
  the file gets the permissions ``open`` would give it."""
  tmp = f'{path}.{secrets.token_hex(4)}.tmp'
  # Created as open() creates files (0666 less the umask), not with mkstemp's 0600; reading the
  # umask would mean setting it, which races with other threads creating files.
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, mode) as f:
      write_fn(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_results(workdir: str | os.PathLike, results: Mapping[str, Any]) -> str:
  """Atomically writes ``results`` to ``workdir/results.json`` (NaN/inf -> null); returns the path."""
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, RESULTS_FILE)
  payload = json.dumps(metrics.to_json_compatible(results), indent=2, allow_nan=False) + '\n'
  atomic_write(path, lambda f: f.write(payload))
  return path


def _as_float_array(values: Sequence[Any]) -> np.ndarray:
  """Lists that went through JSON hold None for NaN; turn them back into NaN for plotting."""
  return np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def accuracy_figure(results: Mapping[str, Any], train_counts: Sequence[int]):
  """The figure :func:`plot_results` writes, as a matplotlib ``Figure`` (Agg canvas, no pyplot).

  Left: TAg accuracy A_t after each phase, both the mean over the tasks seen so far
  (``avg_acc_per_phase``; its mean over phases is the average incremental accuracy) and the
  accuracy on all seen test images (``avg_acc_per_phase_weighted``). For a multi-seed run (a
  ``per_seed`` list) a band shows ± one standard deviation of A_t over the seeds, and the title
  gives the seed count and the average incremental accuracy as mean ± std. Right: final
  per-class accuracy (``per_class_accuracy``, percent) against the class's training-set size
  (log x), which shows how well the tail classes are served.

  Raises:
    ValueError: if ``train_counts`` and ``per_class_accuracy`` differ in length.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator

  acc = _as_float_array(results['avg_acc_per_phase'])
  acc_w = _as_float_array(results['avg_acc_per_phase_weighted'])
  per_class = _as_float_array(results['per_class_accuracy'])
  counts = np.asarray(train_counts, dtype=np.float64)
  if counts.shape != per_class.shape:
    raise ValueError(f'train_counts has {counts.size} entries but per_class_accuracy has '
                     f'{per_class.size}')

  fig = Figure(figsize=(11, 4.2))
  FigureCanvasAgg(fig)
  ax_phase, ax_class = fig.subplots(1, 2)

  phases = np.arange(acc.size)
  ax_phase.plot(phases, acc, 'o-', label='A_t, mean over tasks seen')
  ax_phase.plot(np.arange(acc_w.size), acc_w, 's--', label='A_t, all seen test images')
  title = 'TAg accuracy per phase'
  aia = results.get('average_incremental_accuracy')
  per_seed = results.get('per_seed') or []
  if len(per_seed) > 1:
    std = np.nanstd([_as_float_array(r['avg_acc_per_phase']) for r in per_seed], axis=0)
    ax_phase.fill_between(phases, acc - std, acc + std, alpha=0.2,
                          label='A_t ± 1 std over seeds')
    title += (f'\n{len(per_seed)} seeds, avg. incremental {float(aia):.2f} ± '
              f'{float(results["average_incremental_accuracy_std"]):.2f}%')
  elif aia is not None:
    title += f' (avg. incremental {float(aia):.2f}%)'
  ax_phase.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax_phase.set_xlabel('phase')
  ax_phase.set_ylabel('TAg accuracy (%)')
  ax_phase.set_title(title)
  ax_phase.grid(alpha=0.3)
  ax_phase.legend()

  ax_class.scatter(counts, per_class, s=14, alpha=0.7)
  ax_class.set_xscale('log')
  ax_class.set_xlabel('training images of the class (log)')
  ax_class.set_ylabel('final accuracy (%)')
  ax_class.set_title('Final per-class accuracy vs. training-set size')
  ax_class.grid(alpha=0.3, which='both')
  fig.tight_layout()
  return fig


def plot_results(workdir: str | os.PathLike, results: Mapping[str, Any],
                 train_counts: Sequence[int]) -> str:
  """Writes :func:`accuracy_figure` to ``workdir/accuracy.png``; returns its path.

  Args:
    workdir: output directory.
    results: a run's results (``avg_acc_per_phase``, ``avg_acc_per_phase_weighted``,
      ``per_class_accuracy``; for several seeds also ``per_seed``).
    train_counts: training images per class, aligned with ``per_class_accuracy``.
  """
  fig = accuracy_figure(results, train_counts)
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, PLOT_FILE)
  atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=100), mode='wb')
  return path


def check_workdir(workdir: str | os.PathLike) -> None:
  """Refuses, in one line, a run directory that cannot hold a run's files, before any data is read
  (otherwise the first checkpoint save fails with an OSError traceback from inside Orbax).

  Makes the missing folders of ``workdir`` and creates and removes a file in it, which proves it
  writable; the folders it made go again, so a run refused later for another reason leaves none.
  Nothing already in ``workdir`` is touched.

  Raises:
    ValueError: naming the path, why it cannot be written and the fix (another ``--workdir``).
  """
  workdir = os.fspath(workdir)
  fix = 'give --workdir=<a writable folder> (a new or existing run directory)'
  missing = []
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    missing.append(existing)
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    if existing == os.path.abspath(workdir):
      raise ValueError(f'workdir {workdir} is a file, not a directory: {fix}')
    raise ValueError(f'workdir {workdir} cannot be made ({existing} is a file, not a directory): '
                     f'{fix}')
  made = []
  try:
    for folder in reversed(missing):
      os.mkdir(folder)
      made.append(folder)
    fd, probe = tempfile.mkstemp(prefix='.write-check-', dir=workdir)
    os.close(fd)
    os.remove(probe)
  except OSError as err:
    why = err.strerror or str(err)
    raise ValueError(f'workdir {workdir} cannot be written ({why}'
                     + (f': {err.filename}' if err.filename else '') + f'): {fix}') from None
  finally:
    for folder in reversed(made):
      os.rmdir(folder)


# Keys of a run's results that describe the run rather than a seed's outcome.
_RUN_KEYS = ('seeds', 'task_sizes', 'class_order', 'train_counts', 'config', 'wall_time_s',
             'devices', 'provenance')
def mean_over_seeds(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Mean of every numeric entry over seeds, and ``<key>_std`` (population std) for scalars.

  Nested dicts (e.g. ``shot_accuracy``) are averaged entry by entry; lists element-wise, ignoring
  NaN / None (the undefined upper triangle of accuracy matrices stays NaN).
  """
  out = {}
  for key, value in per_seed[0].items():
    values = [r[key] for r in per_seed]
    if isinstance(value, Mapping):
      out[key] = mean_over_seeds(values)
      continue
    try:
      arr = np.asarray([np.asarray(v, dtype=np.float64) if v is not None else np.nan
                        for v in values], dtype=np.float64)
    except (TypeError, ValueError):
      out[key] = value
      continue
    with warnings.catch_warnings():  # all-NaN entries (u > t in the matrices) stay NaN
      warnings.simplefilter('ignore', RuntimeWarning)
      out[key] = np.nanmean(arr, axis=0).tolist() if arr.ndim > 1 else float(np.nanmean(arr))
      if arr.ndim == 1:
        out[key + '_std'] = float(np.nanstd(arr))
  return out


def seed_summary(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """One seed's results as they are; several seeds' as their mean, ``*_std`` and ``per_seed``."""
  if len(per_seed) == 1:
    return dict(per_seed[0])
  return dict(mean_over_seeds(per_seed), per_seed=list(per_seed))


def _per_seed(results: Mapping[str, Any]) -> list[dict[str, Any]]:
  if 'per_seed' in results:
    return [dict(r) for r in results['per_seed']]
  return [{k: v for k, v in results.items() if k not in _RUN_KEYS}]


def load_results(path: str) -> dict[str, Any]:
  """A ``results.json`` written by a run or by seed pooling (or a run's workdir holding one);
  ValueError in one line otherwise."""
  if os.path.isdir(path):
    if not os.path.exists(os.path.join(path, 'results.json')):
      raise ValueError(f"{path}: a directory without results.json; give a finished run's workdir "
                       "or its results.json")
    path = os.path.join(path, 'results.json')
  try:
    with open(path) as f:
      results = json.load(f)
  except FileNotFoundError:
    raise ValueError(f"{path}: no such file") from None
  except (UnicodeDecodeError, json.JSONDecodeError):
    raise ValueError(f"{path}: not JSON; give a run's results.json") from None
  if (not isinstance(results, dict) or "average_incremental_accuracy" not in results
      or not {"avg_acc_per_phase", "per_seed"} & results.keys()):
    raise ValueError(f"{path}: not a results.json (no average_incremental_accuracy and "
                     "avg_acc_per_phase); give a run's results.json")
  return results


def combine_seed_results(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Pools the ``results.json`` of runs that differ only in their seeds (e.g. run on different
  GPUs or in turn) into one results dict shaped like a multi-seed run's: mean, ``*_std`` and
  ``per_seed``, plus ``wall_time_s`` summed over the runs. Where the data was read from and how
  the runs were checkpointed or spread over devices may differ.

  Raises:
    ValueError: if the runs differ in anything but seeds (config, class order, task sizes) or
      repeat a seed.
  """
  if not runs:
    raise ValueError('combine_seed_results needs at least one results dict')
  def strip(r):
    return config_lib.results_config(r.get('config') or {}, data_location=False, seeds=False)

  first = runs[0]
  first_config = strip(first)
  for i, r in enumerate(runs[1:], 1):
    for key in ('task_sizes', 'class_order', 'train_counts'):
      if r.get(key) != first.get(key):
        raise ValueError(f'run {i} differs from run 0 in {key}: only runs that differ in their '
                         'seeds can be pooled')
    config = strip(r)
    if config != first_config:
      diff = list(config_lib.differences(config, first_config))
      raise ValueError(f'run {i} has another config than run 0 (differs in {diff}): only runs '
                       'that differ in their seeds can be pooled')
  seeds = [s for r in runs for s in r['seeds']]
  if len(set(seeds)) != len(seeds):
    raise ValueError(f'seeds repeat across the runs: {seeds}')
  out = seed_summary([p for r in runs for p in _per_seed(r)])
  out['seeds'] = seeds
  for key in ('task_sizes', 'class_order', 'train_counts', 'config'):
    if key in first:
      out[key] = first[key]
  out['wall_time_s'] = float(sum(r.get('wall_time_s', 0.0) for r in runs))
  # A pooled input contributes its own per-run list, so pooling pooled files keeps one per run.
  out['wall_time_s_per_run'] = [w for r in runs
                                for w in r.get('wall_time_s_per_run', [r.get('wall_time_s')])]
  out['devices'] = sorted({d for r in runs for d in r.get('devices', [])})
  # One entry per run pooled here (a pooled input contributes its list); older runs have none.
  out['provenance'] = [p for r in runs for p in _as_list(r.get('provenance'))]
  return out


def _as_list(value: Any) -> list[Any]:
  if value is None:
    return []
  return list(value) if isinstance(value, list) else [value]
