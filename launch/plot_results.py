r"""Accuracy per phase of several runs in one figure: ``python launch/plot_results.py
--out=results/accuracy_per_phase.png DGR=results/a.json fine-tuning=results/b.json``.

Each input is ``label=path`` to a ``results.json`` (one run, several seeds, or pooled by
``launch/combine_seeds.py``). The curve is the TAg accuracy A_t after each phase (mean over the
seeds); with several seeds a band shows ± one standard deviation over them. The legend gives the
average incremental accuracy (mean ± std) and the seed count.

With ``--diagnostics`` each input is ``label=<run workdir>`` (or its ``diagnostics.npz``) and the
figure puts the runs' diagnostics panels side by side, one column per run (gr_jax.diagnostics:
weight norms, Φ vs N_c, forgetting vs lost data, r and β per phase), e.g.
``python launch/plot_results.py --diagnostics --out=diag.png DGR=runs/a finetune=runs/b``.
For a multi-seed run (diagnostics in ``<workdir>/seed_<s>/``) the column shows its first seed
and its titles say so.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import numpy as np

from gr_jax import report

_OUT = flags.DEFINE_string("out", None, "PNG to write.")
_TITLE = flags.DEFINE_string("title", "TAg accuracy after each phase", "Figure title.")
_DIAGNOSTICS = flags.DEFINE_bool(
    "diagnostics", False, "Draw the runs' diagnostics panels side by side; each input is "
    "label=<run workdir> holding diagnostics.npz (or seed_<s>/diagnostics.npz: the first seed's).")
_PHASE = flags.DEFINE_integer(
    "phase", None, "With --diagnostics: the phase of the Φ vs N_c panel (default: the last).")
flags.mark_flag_as_required("out")


def _curves(results):
  per_seed = results.get("per_seed") or [results]
  acc = np.asarray([[np.nan if v is None else v for v in r["avg_acc_per_phase"]]
                    for r in per_seed], dtype=np.float64)
  return acc.mean(axis=0), acc.std(axis=0), len(per_seed)


def _figure(size):
  """A matplotlib Figure on an Agg canvas (no pyplot: no global state, no backend switching)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=size)
  FigureCanvasAgg(fig)
  return fig


def _seed_dirs(path):
  """The ``seed_<s>`` subfolders of a multi-seed workdir that hold diagnostics: [(s, dir)], by s."""
  from gr_jax import diagnostics  # pylint: disable=g-import-not-at-top
  found = []
  for name in os.listdir(path) if os.path.isdir(path) else ():
    seed = name.removeprefix("seed_")
    sub = os.path.join(path, name)
    if seed != name and seed.isdigit() and os.path.isfile(
        os.path.join(sub, diagnostics.DIAGNOSTICS_FILE)):
      found.append((int(seed), sub))
  return sorted(found)


def _load_diagnostics(label, path):
  """(label, diagnostics) of a run; a multi-seed run gives its first seed's, named in the label.

  gr_jax is imported here: the accuracy plot needs no JAX.
  """
  from gr_jax import diagnostics  # pylint: disable=g-import-not-at-top
  diag = diagnostics.load(path)
  if diag is not None:
    return label, diag
  seeds = _seed_dirs(path)
  if not seeds:
    raise ValueError(f"{path}: no {diagnostics.DIAGNOSTICS_FILE} (nor seed_<s>/"
                     f"{diagnostics.DIAGNOSTICS_FILE}); give the workdir of a run that recorded "
                     "diagnostics")
  seed, seed_dir = seeds[0]
  return f"{label} (seed {seed}, first of {len(seeds)})", diagnostics.load(seed_dir)


def _draw_diagnostics(runs):
  """One column of diagnostics panels per run; rows share their y-axis so runs compare."""
  from gr_jax import diagnostics  # pylint: disable=g-import-not-at-top
  fig = _figure((6 * len(runs), 16))
  axes = fig.subplots(4, len(runs), squeeze=False, sharey="row")
  for column, (label, diag) in enumerate(runs):
    try:
      diagnostics.draw_panels(axes[:, column], diag, _PHASE.value, label)
    except ValueError as e:
      raise SystemExit(f"error: {label}: {e}") from None
  if _TITLE.present:
    fig.suptitle(_TITLE.value)
  return fig


def _draw_accuracy(runs):
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top
  fig = _figure((7.5, 4.5))
  ax = fig.subplots()
  for label, results in runs:
    mean, std, seeds = _curves(results)
    phases = np.arange(mean.size)
    aia = results["average_incremental_accuracy"]
    text = f"{label}: AIA {aia:.2f}"
    if seeds > 1:
      text += f" ± {results['average_incremental_accuracy_std']:.2f} ({seeds} seeds)"
      ax.fill_between(phases, mean - std, mean + std, alpha=0.2)
    ax.plot(phases, mean, "o-", ms=3, label=text)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlabel("phase")
  ax.set_ylabel("TAg accuracy A_t (%)")
  ax.set_title(_TITLE.value)
  ax.grid(alpha=0.3)
  ax.legend()
  return fig


def main(argv):
  inputs = argv[1:]
  unlabelled = [a for a in inputs if "=" not in a]
  if not inputs or unlabelled:
    expected = "<run workdir>" if _DIAGNOSTICS.value else "path/to/results.json (or <run workdir>)"
    raise SystemExit(f"error: give each run as label={expected}"
                     + (f"; no label in {unlabelled[0]!r}" if unlabelled else ""))
  runs = []
  for item in inputs:
    label, path = item.split("=", 1)
    try:
      runs.append(_load_diagnostics(label, path) if _DIAGNOSTICS.value
                  else (label, report.load_results(path)))
    except ValueError as e:
      raise SystemExit(f"error: {e}") from None
  fig = (_draw_diagnostics if _DIAGNOSTICS.value else _draw_accuracy)(runs)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  fig.savefig(_OUT.value, dpi=100)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
