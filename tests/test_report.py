"""Tests for gr_jax.report: metrics.jsonl, TensorBoard events, results.json and the plot."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gr_jax import report
from processes import run_side_by_side

_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _tb_scalars(tb_dir):
  """Reads scalars back with TensorBoard's own loader: {tag: [(step, value), ...]}."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(str(tb_dir))
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


def test_metrics_jsonl_and_tensorboard_round_trip(tmp_path):
  with report.MetricWriter(tmp_path) as w:
    w.write_scalars(1, {'train/loss': np.float32(2.5), 'lr': 0.1}, phase=0, epoch=0)
    w.write_scalars(2, {'train/loss': 1.25, 'lr': np.array(0.1)}, phase=0, epoch=1)

  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  records = [json.loads(line) for line in lines]
  assert records == [
      {'phase': 0, 'epoch': 0, 'step': 1, 'train/loss': 2.5, 'lr': pytest.approx(0.1)},
      {'phase': 0, 'epoch': 1, 'step': 2, 'train/loss': 1.25, 'lr': pytest.approx(0.1)},
  ]

  event_files = os.listdir(tmp_path / 'tensorboard')
  assert len(event_files) == 1 and 'tfevents' in event_files[0]
  scalars = _tb_scalars(tmp_path / 'tensorboard')
  assert scalars['train/loss'] == [(1, 2.5), (2, 1.25)]
  assert [s for s, _ in scalars['lr']] == [1, 2]
  np.testing.assert_allclose([v for _, v in scalars['lr']], [0.1, 0.1], rtol=1e-6)


def test_metric_writer_appends_on_resume_and_repairs_torn_tail(tmp_path):
  with report.MetricWriter(tmp_path) as w:
    w.write_scalars(1, {'x': 1.0}, phase=0)
  # Simulate a crash mid-write: a torn JSON line and a torn TensorBoard record.
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"phase": 0, "st')
  events = tmp_path / 'tensorboard' / report.EVENTS_FILE
  with open(events, 'ab') as f:
    f.write(b'\x40\x00\x00\x00\x00\x00\x00\x00garbage')
  with report.MetricWriter(tmp_path) as w:
    w.write_scalars(2, {'x': 2.0}, phase=1)

  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert json.loads(lines[0]) == {'phase': 0, 'step': 1, 'x': 1.0}
  assert json.loads(lines[-1]) == {'phase': 1, 'step': 2, 'x': 2.0}
  assert _tb_scalars(tmp_path / 'tensorboard')['x'] == [(1, 1.0), (2, 2.0)]


def test_metric_writer_flushes_each_record_for_readers_while_it_runs(tmp_path):
  w = report.MetricWriter(tmp_path)
  w.write_scalars(1, {'x': 1.0}, phase=0)
  # Still open: another process (a tail -f, TensorBoard) already sees the record.
  assert json.loads((tmp_path / 'metrics.jsonl').read_text()) == {'phase': 0, 'step': 1, 'x': 1.0}
  assert _tb_scalars(tmp_path / 'tensorboard')['x'] == [(1, 1.0)]
  w.close()


def test_resume_drops_the_records_written_after_the_checkpoint(tmp_path):
  """A run killed after step 3 whose last checkpoint is at step 2: the resumed run rewrites
  step 3, and both files show each step once, with the resumed run's value."""
  w = report.MetricWriter(tmp_path)
  for step in (1, 2, 3):
    w.write_scalars(step, {'x': float(step)}, phase=0)
  del w  # killed: never closed
  with report.MetricWriter(tmp_path, resume_step=2) as w:
    w.write_scalars(3, {'x': 30.0}, phase=0)
    w.write_scalars(4, {'x': 40.0}, phase=0)
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r['x']) for r in records] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
  assert _tb_scalars(tmp_path / 'tensorboard')['x'] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_written_files_get_the_usual_permissions(tmp_path):
  umask = os.umask(0o022)
  try:
    path = report.write_results(tmp_path, {'a': 1})
  finally:
    os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o644


def test_metric_writer_does_not_import_tensorflow(tmp_path):
  code = textwrap.dedent(f"""
      import sys
      from gr_jax import report
      with report.MetricWriter({str(tmp_path)!r}) as w:
        w.write_scalars(0, {{'a': 1.0}})
      print('tensorflow' in sys.modules)
  """)
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.stdout.strip() == 'False'


def test_write_results_round_trip_nan_to_null(tmp_path):
  results = {
      'average_incremental_accuracy': np.float64(34.35),
      'acc_tag': np.array([[50.0, np.nan], [40.0, 30.0]], dtype=np.float32),
      'forgetting': [float('nan'), 10.0],
      'num_phases': np.int64(2),
      'inf': float('inf'),
      'nested': {1: (np.bool_(True), 'ok')},
  }
  path = report.write_results(tmp_path, results)
  assert path == os.path.join(tmp_path, 'results.json')
  with open(path) as f:
    loaded = json.load(f)
  assert loaded == {
      'average_incremental_accuracy': 34.35,
      'acc_tag': [[50.0, None], [40.0, 30.0]],
      'forgetting': [None, 10.0],
      'num_phases': 2,
      'inf': None,
      'nested': {'1': [True, 'ok']},
  }
  assert [p for p in os.listdir(tmp_path) if p.endswith('.tmp')] == []
  # Overwriting replaces the file whole.
  report.write_results(tmp_path, {'a': 1})
  with open(path) as f:
    assert json.load(f) == {'a': 1}


def test_plot_results_writes_png(tmp_path):
  per_class = [90.0, 70.0, 40.0, None, 5.0]  # None as after a JSON round trip of NaN
  results = {
      'avg_acc_per_phase': [80.0, 60.0, 45.5],
      'avg_acc_per_phase_weighted': [80.0, 58.0, 44.0],
      'per_class_accuracy': per_class,
      'average_incremental_accuracy': 61.8,
  }
  path = report.plot_results(tmp_path, results, train_counts=[500, 200, 50, 20, 5])
  assert path == os.path.join(tmp_path, 'accuracy.png')
  data = open(path, 'rb').read()
  assert data[:8] == _PNG_MAGIC
  width, height = int.from_bytes(data[16:20], 'big'), int.from_bytes(data[20:24], 'big')
  assert (width, height) == (1100, 420)  # figsize (11, 4.2) at 100 dpi
  assert len(data) > 10_000


def _seed_results(*curves):
  """A multi-seed results dict as report.seed_summary makes it, one A_t curve per seed."""
  per_seed = [{'avg_acc_per_phase': list(c), 'avg_acc_per_phase_weighted': list(c),
               'per_class_accuracy': [50.0, 40.0], 'average_incremental_accuracy': float(np.mean(c)),
               'last_accuracy': c[-1]} for c in curves]
  return report.seed_summary(per_seed)


def test_accuracy_figure_labels_integer_phases_and_a_seed_band(tmp_path):
  """The legend says what A_t averages (the tasks seen; its mean over phases is the AIA), phase
  ticks are integers, and several seeds get a ± 1 std band and n, AIA mean ± std in the title."""
  curves = ([80.0, 60.0, 50.0, 40.0, 30.0, 20.0], [70.0, 64.0, 46.0, 44.0, 26.0, 22.0])
  results = _seed_results(*curves)
  fig = report.accuracy_figure(results, train_counts=[500, 5])
  fig.canvas.draw()
  ax_phase = fig.axes[0]
  labels = [t.get_text() for t in ax_phase.get_legend().get_texts()]
  assert labels == ['A_t, mean over tasks seen', 'A_t, all seen test images',
                    'A_t ± 1 std over seeds']
  ticks = [t.get_text().replace('\u2212', '-') for t in ax_phase.get_xticklabels()]
  assert ticks and all(t.lstrip('-').isdigit() for t in ticks), ticks
  (band,) = ax_phase.collections
  upper = band.get_paths()[0].vertices[:, 1].max()
  lower = band.get_paths()[0].vertices[:, 1].min()
  std = np.std(curves, axis=0)
  # The band's ends are mean ± population std of the seeds; float64 path vertices, exact to ~1e-12.
  np.testing.assert_allclose([upper, lower], [max(np.mean(curves, 0) + std),
                                              min(np.mean(curves, 0) - std)], rtol=1e-12)
  aia = np.mean(curves, axis=1)
  title = ax_phase.get_title()
  assert '2 seeds' in title and f'{aia.mean():.2f} ± {aia.std():.2f}%' in title, title
  single = report.accuracy_figure(results['per_seed'][0], train_counts=[500, 5])
  assert not single.axes[0].collections  # one seed: no band
  path = report.plot_results(tmp_path, results, train_counts=[500, 5])
  assert open(path, 'rb').read(8) == _PNG_MAGIC and os.path.getsize(path) > 10_000


def test_check_workdir_makes_nothing_and_touches_nothing(tmp_path):
  """A new workdir is proved writable and left absent (a run refused later makes none); an
  existing one keeps what it holds."""
  new = tmp_path / 'a' / 'b' / 'run'
  report.check_workdir(new)
  assert not (tmp_path / 'a').exists()
  (tmp_path / 'old').mkdir()
  (tmp_path / 'old' / 'results.json').write_text('{}')
  report.check_workdir(str(tmp_path / 'old'))
  assert os.listdir(tmp_path / 'old') == ['results.json']


def test_check_workdir_refuses_what_cannot_be_written_in_one_line(tmp_path):
  """A file, a path inside a file, and a folder where files cannot be created (/proc refuses
  them even to root; a read-only folder refuses them to other users) each give one line naming the
  path, why, and the fix."""
  notes = tmp_path / 'notes.txt'
  notes.write_text('kept')
  cases = [(notes, 'is a file, not a directory'),
           (notes / 'run', f'{notes} is a file, not a directory'),
           ('/proc/gr_jax_run', 'cannot be written')]
  if os.geteuid() != 0:
    locked = tmp_path / 'locked'
    locked.mkdir(mode=0o555)
    cases.append((locked / 'run', 'Permission denied'))
  for workdir, says in cases:
    with pytest.raises(ValueError) as err:
      report.check_workdir(workdir)
    message = str(err.value)
    assert '\n' not in message and says in message and str(workdir) in message, message
    assert '--workdir=<a writable folder>' in message, message
  assert notes.read_text() == 'kept'


def test_plot_results_rejects_misaligned_counts(tmp_path):
  results = {'avg_acc_per_phase': [1.0], 'avg_acc_per_phase_weighted': [1.0],
             'per_class_accuracy': [1.0, 2.0]}
  with pytest.raises(ValueError, match='train_counts'):
    report.plot_results(tmp_path, results, train_counts=[10])
  assert not (tmp_path / 'accuracy.png').exists()


def test_plot_results_script_draws_runs_with_seed_bands(tmp_path):
  """launch/plot_results.py: a pooled multi-seed run (band) and a single run in one PNG."""
  one = {'avg_acc_per_phase': [60.0, 40.0, None], 'average_incremental_accuracy': 50.0}
  pooled = {'average_incremental_accuracy': 45.0, 'average_incremental_accuracy_std': 1.0,
            'per_seed': [{'avg_acc_per_phase': [55.0, 35.0, 30.0]},
                         {'avg_acc_per_phase': [57.0, 33.0, 31.0]}]}
  paths = []
  for name, results in (('one', one), ('pooled', pooled)):
    paths.append(tmp_path / f'{name}.json')
    paths[-1].write_text(json.dumps(results))
  out = tmp_path / 'phases.png'
  nested = tmp_path / 'new_dir' / 'phases.png'  # a missing output folder is created
  other = tmp_path / 'bench.json'
  other.write_text(json.dumps({'img_s': 1.0}))
  figure = tmp_path / 'figure.png'
  figure.write_bytes(_PNG_MAGIC + bytes(8))
  wrong = ((other, 'not a results.json'), (tmp_path / 'nope.json', 'no such file'),
           (figure, 'not JSON'))
  script = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'launch', 'plot_results.py')
  done, bad, done_nested, *bad_inputs = run_side_by_side(
      [[sys.executable, script, f'--out={out}', f'single={paths[0]}', f'two seeds={paths[1]}'],
       [sys.executable, script, f'--out={out}', str(paths[0])],
       [sys.executable, script, f'--out={nested}', f'single={paths[0]}']]
      + [[sys.executable, script, f'--out={out}', f'x={path}'] for path, _ in wrong])
  assert done.returncode == 0, done.stderr
  assert out.read_bytes()[:8] == _PNG_MAGIC
  assert bad.returncode != 0 and 'label=path' in bad.stderr
  assert bad.stderr.strip().splitlines() == [bad.stderr.strip()], 'one line, no --help dump'
  assert done_nested.returncode == 0 and nested.exists(), done_nested.stderr
  for (_, says), bad in zip(wrong, bad_inputs):
    assert bad.returncode != 0 and says in bad.stderr, bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()], 'a one-line error'


def test_runs_pool_across_data_locations_but_not_across_data():
  # The same dataset read from another path, checkpointed at other intervals: same experiment.
  def run(seed, path, every=160, order=(0, 1), name='cifar100'):
    config = {'model': 'resnet32', 'seed': seed, 'checkpoint': {'every_seconds': every},
              'data': {'source': 'npz', 'name': name, 'path': path, 'data_dir': ''}}
    return {'config': config, 'seeds': [seed], 'task_sizes': [5, 5], 'class_order': list(order),
            'train_counts': [3, 2], 'average_incremental_accuracy': 30.0 + seed}

  pooled = report.combine_seed_results([run(0, '.carry/c.npz'), run(1, '/tmp/c.npz', every=20)])
  assert pooled['seeds'] == [0, 1] and pooled['average_incremental_accuracy'] == 30.5
  with pytest.raises(ValueError, match='class_order'):
    report.combine_seed_results([run(0, 'a.npz'), run(1, 'b.npz', order=(1, 0))])
  with pytest.raises(ValueError, match=r"differs in \['data.name'\]"):
    report.combine_seed_results([run(0, 'a.npz'), run(1, 'a.npz', name='other')])


def test_pooled_runs_keep_each_runs_provenance():
  def run(seed, commit):
    return {'config': {'model': 'resnet32', 'seed': seed}, 'seeds': [seed], 'task_sizes': [5, 5],
            'class_order': [0, 1], 'train_counts': [3, 2], 'average_incremental_accuracy': 30.0,
            'provenance': {'commit': commit}}

  first = report.combine_seed_results([run(0, 'aaaaaaa'), run(1, 'bbbbbbb')])
  assert 'provenance' not in first['per_seed'][0]
  again = report.combine_seed_results([first, run(2, 'ccccccc'),
                                       {**run(3, ''), 'provenance': None}])
  assert [p['commit'] for p in again['provenance']] == ['aaaaaaa', 'bbbbbbb', 'ccccccc']


def test_pooling_a_pooled_file_keeps_one_wall_time_per_run():
  def run(seed, wall):
    return {'config': {'model': 'resnet32', 'seed': seed}, 'seeds': [seed], 'task_sizes': [5, 5],
            'class_order': [0, 1], 'train_counts': [3, 2], 'average_incremental_accuracy': 30.0,
            'wall_time_s': wall}

  first = report.combine_seed_results([run(0, 100.0), run(1, 200.0)])
  again = report.combine_seed_results([first, run(2, 400.0)])
  assert again['wall_time_s_per_run'] == [100.0, 200.0, 400.0]
  assert again['wall_time_s'] == 700.0 and again['seeds'] == [0, 1, 2]


def test_a_run_workdir_stands_for_its_results_json(tmp_path):
  run_dir = tmp_path / 'run'
  run_dir.mkdir()
  with pytest.raises(ValueError, match='a directory without results.json'):
    report.load_results(str(run_dir))
  results = {'average_incremental_accuracy': 30.0, 'avg_acc_per_phase': [30.0]}
  (run_dir / 'results.json').write_text(json.dumps(results))
  assert report.load_results(str(run_dir)) == results
