"""Per-phase diagnostics of a run: the paper's argument (docs/method.md §2–§4) measured on it.

Imbalanced data skews the classifier's gradient updates: frequent and new classes accumulate
larger cumulative gradient norms Φ_c and end with larger weight norms ‖W_c‖. Gradient reweighting
evens the cumulative updates out (α, r_old, r_new, β). Forgetting is itself imbalanced: old classes
that lost most of their data to the memory (R_c = N_c − min(N_c, M)) forget most. This module turns
the quantities the trainer holds at the end of each phase into one record per phase, stacks the
records in ``workdir/diagnostics.npz`` and draws them in ``workdir/diagnostics.png``. A run trains
one seed; a multi-seed run keeps each seed's diagnostics in its ``workdir/seed_<s>``.

Pure host-side NumPy (and matplotlib without pyplot); nothing here runs in the train step.

Layout of ``diagnostics.npz``: every array has the leading axis ``[P]``, the recorded phases (their
numbers in ``phase``, int ``[P]``); per-class entries are ``[P, C]``, per-phase ones ``[P]``.
Per class: ``train_counts`` N_c, ``prior_counts`` (the counts behind π), ``lost_counts`` R_c,
``old_classes`` and ``new_classes`` (bool), ``cumulative_norms`` Φ_c, ``cumulative_kd_norms``,
``alpha`` α_c, ``class_scale`` s_c, ``weight_norm`` ‖W_c‖, ``bias`` b_c and ``accuracy`` (TAg,
percent, NaN for unseen classes and classes without test images). Per phase: ``r_old``, ``r_new``, ``gamma`` γ, ``kd_weight`` λ, ``entropy``
H, ``beta_mean``, ``beta_min``, ``beta_max`` (β over the phase's steps) and ``beta_last`` (the last
step's β). Quantities a run did not produce (Φ, s, β without reweighting; r_old in a phase without
old classes) are NaN.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional

import numpy as np

from gr_jax import losses
from gr_jax import metrics
from gr_jax import report
from gr_jax.phase_constants import PhaseConstants
from gr_jax.reweight import GradientReweightingState
from gr_jax.reweight import reweighting_factors

DIAGNOSTICS_FILE = 'diagnostics.npz'
PLOT_FILE = 'diagnostics.png'
_SHOT_COLOURS = {'many': 'C0', 'medium': 'C1', 'few': 'C3'}


class KDScaleStats(NamedTuple):
  """β (the KD rows' factor of DGR) over one phase's steps: its mean, min and max."""
  mean: float
  min: float
  max: float


def phase_record(consts: PhaseConstants, train_counts: Any, classifier: Mapping[str, Any],
                 correct_tag: Any, num_test: Any, *,
                 reweight_state: Optional[GradientReweightingState] = None,
                 kd_scale_stats: Optional[KDScaleStats] = None,
                 cumulative_grad_norms: Any = None) -> dict[str, np.ndarray]:
  """The run's diagnostics at the end of a phase (host arrays; see the module doc for the keys).

  α, r_old and r_new are recomputed from the phase's final Φ (``gr_jax.reweight.
  reweighting_factors``), so they are the factors the last step applied; s_c and β come from the
  transform's state as it applied them.

  Args:
    consts: the phase's :class:`PhaseConstants`.
    train_counts: N_c, int ``[C]``.
    classifier: the classifier params at phase end, ``{'kernel': [D, C], 'bias': [C]}``.
    correct_tag: ``[C]`` test images of each class classified correctly (TAg) after the phase.
    num_test: ``[C]`` test images per class.
    reweight_state: the reweighting transform's state at phase end; None for a run without
      reweighting (Φ, α, s, r and β are then NaN unless ``cumulative_grad_norms`` is given).
    kd_scale_stats: β over the phase's steps, or None (NaN).
    cumulative_grad_norms: ``[C]`` Σ of the CE gradient-row norms over the phase's steps, measured
      outside the transform; overrides the state's Φ. For a run without reweighting this makes the
      imbalance visible: α, r_old, r_new are then the factors reweighting *would* have applied.
  """
  old = np.asarray(consts.old_classes, bool)
  new = np.asarray(consts.new_classes, bool)
  num_classes = old.shape[0]
  nan = np.full(num_classes, np.nan)
  kernel = np.asarray(classifier['kernel'], np.float64)
  if kernel.shape[-1] != num_classes:
    raise ValueError(f"classifier kernel {kernel.shape} does not end in the {num_classes} classes "
                     "of the phase constants; pass the classifier params {'kernel': [D, C], ...}")
  if cumulative_grad_norms is not None:
    phi = np.asarray(cumulative_grad_norms, np.float64)
  elif reweight_state is not None:
    phi = np.asarray(reweight_state.cumulative_norms, np.float64)
  else:
    phi = nan
  gamma = float(np.asarray(consts.gamma))
  alpha, r_old, r_new = nan, np.nan, np.nan
  if np.all(np.isfinite(phi)):
    factors = reweighting_factors(phi, old, new, gamma)
    alpha = np.asarray(factors.alpha, np.float64)
    r_old = float(factors.r_old) if old.any() else np.nan  # no old group to balance in phase 0
    r_new = float(factors.r_new)
  if reweight_state is None:
    class_scale = kd_norms = nan
    beta_last = np.nan
  else:
    class_scale = np.asarray(reweight_state.class_scale, np.float64)
    kd_norms = np.asarray(reweight_state.cumulative_kd_norms, np.float64)
    beta_last = float(reweight_state.kd_scale)
  beta = kd_scale_stats or KDScaleStats(np.nan, np.nan, np.nan)
  num_test = np.asarray(num_test, np.float64)
  has_test = (old | new) & (num_test > 0)
  accuracy = np.where(has_test, 100 * np.asarray(correct_tag, np.float64)
                      / np.where(has_test, num_test, 1), np.nan)
  scalar = lambda x: np.asarray(x, np.float64)
  return {
      'train_counts': np.asarray(train_counts, np.int64),
      'prior_counts': np.asarray(consts.class_counts, np.float64),
      'lost_counts': np.asarray(consts.lost_counts, np.float64),
      'old_classes': old,
      'new_classes': new,
      'cumulative_norms': phi,
      'cumulative_kd_norms': kd_norms,
      'alpha': alpha,
      'class_scale': class_scale,
      'weight_norm': np.linalg.norm(kernel.reshape(-1, num_classes), axis=0),
      'bias': np.asarray(classifier['bias'], np.float64),
      'accuracy': accuracy,
      'r_old': scalar(r_old),
      'r_new': scalar(r_new),
      'gamma': scalar(gamma),
      'kd_weight': scalar(consts.kd_weight),
      'entropy': scalar(losses.lost_count_entropy(consts.lost_counts, consts.old_classes)),
      'beta_mean': scalar(beta.mean),
      'beta_min': scalar(beta.min),
      'beta_max': scalar(beta.max),
      'beta_last': scalar(beta_last),
  }


def append(diag: Optional[Mapping[str, np.ndarray]], phase: int,
           record: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """``diag`` with ``record`` (a :func:`phase_record`) stored as phase ``phase``.

  Entries of phase ``phase`` or later are dropped first, so a run resumed from a checkpoint taken
  before the diagnostics of a phase were saved records that phase once. ``diag`` None starts anew.
  """
  stacked = {k: np.asarray(v)[None] for k, v in record.items()}
  stacked['phase'] = np.asarray([phase], np.int64)
  if not diag:
    return stacked
  keep = np.asarray(diag['phase']) < phase
  out = {}
  for key, value in stacked.items():
    if key not in diag or np.shape(diag[key])[1:] != value.shape[1:]:
      raise ValueError(f"diagnostics entry {key!r} of phase {phase} has shape {value.shape[1:]}, "
                       f"the recorded phases {np.shape(diag.get(key))[1:]}: the classes changed; "
                       f"move {DIAGNOSTICS_FILE} out of the workdir to record anew")
    out[key] = np.concatenate([np.asarray(diag[key])[keep], value])
  return out


def save(workdir: str | os.PathLike, diag: Mapping[str, np.ndarray]) -> str:
  """Atomically writes ``workdir/diagnostics.npz``; returns its path."""
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, DIAGNOSTICS_FILE)
  report.atomic_write(path, lambda f: np.savez(f, **diag), mode='wb')
  return path


def load(path: str | os.PathLike) -> Optional[dict[str, np.ndarray]]:
  """The diagnostics in ``path`` (a run's workdir or its ``diagnostics.npz``); None if it has none.

  Raises:
    ValueError: (one line) for a file that is not a diagnostics file.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, DIAGNOSTICS_FILE)
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as data:
      diag = {k: data[k] for k in data.files}
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not a readable diagnostics file ({e}); delete it to record the "
                     "diagnostics anew") from None
  if 'phase' not in diag or 'weight_norm' not in diag:
    raise ValueError(f"{path}: an .npz without the diagnostics entries (phase, weight_norm, ...); "
                     f"give a run's workdir holding the {DIAGNOSTICS_FILE} it wrote")
  return diag


def _phi_spread(phi: np.ndarray, seen: np.ndarray) -> float:
  """max Φ / min Φ over the seen classes with Φ > 0: how unevenly the updates were spread."""
  phi = phi[seen & (phi > 0)]
  return float(phi.max() / phi.min()) if phi.size else np.nan


def tensorboard_scalars(record: Mapping[str, Any]) -> dict[str, float]:
  """TensorBoard scalars of a :func:`phase_record`, less those the run did not produce (NaN)."""
  old, new = np.asarray(record['old_classes']), np.asarray(record['new_classes'])
  norm = np.asarray(record['weight_norm'])
  scalars = {
      **{f'diag/{k}': float(record[k]) for k in ('r_old', 'r_new', 'gamma', 'kd_weight', 'entropy',
                                                 'beta_mean', 'beta_min', 'beta_max')},
      'diag/weight_norm_old_mean': float(norm[old].mean()) if old.any() else np.nan,
      'diag/weight_norm_new_mean': float(norm[new].mean()) if new.any() else np.nan,
      'diag/phi_max_over_min': _phi_spread(np.asarray(record['cumulative_norms']), old | new),
  }
  return {k: v for k, v in scalars.items() if np.isfinite(v)}


def class_forgetting(diag: Mapping[str, np.ndarray]) -> np.ndarray:
  """Per-class TAg forgetting after the last recorded phase, ``[C]`` (NaN where undefined).

  ``metrics.class_forgetting`` on the per-class accuracies ``[P, C]``: a class's best accuracy in
  an earlier recorded phase minus its accuracy now; NaN for classes new in the last phase.
  """
  return metrics.class_forgetting(np.asarray(diag['accuracy'], np.float64))[-1]


def _ranks(x: np.ndarray) -> np.ndarray:
  """Ranks with ties given their mean rank (as Spearman's ρ needs)."""
  order = np.empty(x.size)
  order[np.argsort(x, kind='stable')] = np.arange(x.size)
  _, tie, counts = np.unique(x, return_inverse=True, return_counts=True)
  return (np.bincount(tie, order) / counts)[tie]


def correlations(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
  """Pearson r and Spearman ρ of two samples (NaN when one is constant or shorter than 2)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return np.nan, np.nan
  return float(np.corrcoef(x, y)[0, 1]), float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])


def _arrival_order(diag: Mapping[str, np.ndarray],
                   seen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The seen classes ordered by the recorded phase they arrived in, and that phase for each."""
  new = np.asarray(diag['new_classes'])  # [P, C]
  phases = np.asarray(diag['phase'])
  arrival = np.where(new.any(0), phases[np.argmax(new, axis=0)], np.iinfo(np.int64).max)
  classes = np.flatnonzero(seen)
  classes = classes[np.argsort(arrival[classes], kind='stable')]
  return classes, arrival[classes]


def _note(ax, text: str):
  ax.text(0.5, 0.5, text, transform=ax.transAxes, ha='center', va='center', fontsize=9,
          color='0.4', wrap=True)


def draw_panels(axes: Sequence[Any], diag: Mapping[str, np.ndarray], phase: Optional[int] = None,
                label: str = ''):
  """Draws the four diagnostics panels of one run on ``axes`` (four matplotlib Axes).

  (a) ‖W_c‖ after the last phase by class in order of arrival, coloured by shot group: without
  reweighting, frequent and new classes get the large norms. (b) Φ_c against N_c in ``phase``
  (default: the last recorded one). (c) per-class forgetting against the lost fraction R_c / N_c,
  with a fitted line and Pearson r / Spearman ρ. (d) r_old, r_new and β (mean, min–max band) per
  phase.
  """
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top
  ax_norm, ax_phi, ax_forget, ax_factors = axes
  prefix = f'{label}: ' if label else ''
  phases = np.asarray(diag['phase'])
  last = int(phases[-1])
  counts = np.asarray(diag['train_counts'])[-1].astype(np.float64)
  old = np.asarray(diag['old_classes'])[-1]
  seen = old | np.asarray(diag['new_classes'])[-1]

  classes, arrival = _arrival_order(diag, seen)
  norm = np.asarray(diag['weight_norm'])[-1, classes]
  groups = metrics.shot_groups(counts[classes])
  position = np.arange(classes.size)
  for name, mask in groups.items():
    if mask.any():
      ax_norm.scatter(position[mask], norm[mask], s=12, color=_SHOT_COLOURS[name],
                      label=f'{name}-shot ({int(mask.sum())})')
  for boundary in np.flatnonzero(np.diff(arrival)) + 0.5:
    ax_norm.axvline(boundary, color='0.7', lw=0.6, ls='--')
  ax_norm.set_xlabel('class, in order of arrival (dashed: phase boundaries)')
  ax_norm.set_ylabel('‖W_c‖')
  ax_norm.set_title(f'{prefix}classifier weight norm after phase {last}', fontsize=10)
  ax_norm.legend(fontsize=8)

  shown = len(phases) - 1 if phase is None else np.flatnonzero(phases == phase)
  if np.size(shown) == 0:
    raise ValueError(f"phase {phase} is not recorded in these diagnostics (phases "
                     f"{phases.tolist()}); pick one of those")
  index = int(np.ravel(shown)[0])
  phi = np.asarray(diag['cumulative_norms'])[index]
  phase_old = np.asarray(diag['old_classes'])[index]
  phase_new = np.asarray(diag['new_classes'])[index]
  phase_counts = np.asarray(diag['train_counts'])[index]
  ax_phi.set_title(f'{prefix}cumulative gradient norm Φ_c in phase {int(phases[index])}',
                   fontsize=10)
  if np.isnan(phi[phase_old | phase_new]).all():
    _note(ax_phi, 'Φ not recorded (a run without gradient reweighting)')
  else:
    for mask, name, marker in ((phase_old, 'old classes', 'o'), (phase_new, 'new classes', '^')):
      if mask.any():
        ax_phi.scatter(phase_counts[mask], phi[mask], s=14, marker=marker, label=name)
    ax_phi.set_xscale('log')
    ax_phi.legend(fontsize=8)
  ax_phi.set_xlabel('N_c, training images of the class (log)')
  ax_phi.set_ylabel('Φ_c')

  forget = class_forgetting(diag)
  lost = np.asarray(diag['lost_counts'])[-1] / np.maximum(counts, 1)
  has = old & np.isfinite(forget)
  ax_forget.set_title(f'{prefix}per-class forgetting after phase {last}', fontsize=10)
  if has.sum() < 2:
    _note(ax_forget, 'needs old classes seen in at least two phases')
  else:
    pearson, spearman = correlations(lost[has], forget[has])
    ax_forget.scatter(lost[has], forget[has], s=12, alpha=0.7,
                      label=f'Pearson r {pearson:.2f}, Spearman ρ {spearman:.2f}')
    if np.ptp(lost[has]) > 0:
      slope, intercept = np.polyfit(lost[has], forget[has], 1)
      x = np.linspace(lost[has].min(), lost[has].max(), 2)
      ax_forget.plot(x, slope * x + intercept, 'k--', lw=1, label=f'fit, slope {slope:.1f}')
    ax_forget.legend(fontsize=8)
  ax_forget.set_xlabel('lost fraction R_c / N_c')
  ax_forget.set_ylabel('forgetting (accuracy points)')

  ax_factors.set_title(f'{prefix}group factors r and KD factor β per phase', fontsize=10)
  ax_factors.set_xlabel('phase')
  ax_factors.set_ylabel('r')
  ax_factors.xaxis.set_major_locator(MaxNLocator(integer=True))
  factors = {k: np.asarray(diag[k], np.float64) for k in ('r_old', 'r_new', 'beta_mean',
                                                           'beta_min', 'beta_max')}
  if all(np.isnan(v).all() for v in factors.values()):
    _note(ax_factors, 'r and β not recorded (a run without gradient reweighting)')
  else:
    ax_factors.plot(phases, factors['r_old'], 'o-', ms=3, label='r_old')
    ax_factors.plot(phases, factors['r_new'], 's-', ms=3, label='r_new')
    handles_of = [ax_factors]
    if np.isnan(factors['beta_mean']).all():  # Φ recorded by the step, no reweighting applied
      ax_factors.set_title(f'{prefix}r that GR would apply (not applied) per phase', fontsize=10)
    else:
      ax_beta = ax_factors.twinx()
      ax_beta.plot(phases, factors['beta_mean'], 'C2^-', ms=3, label='β (mean)')
      ax_beta.fill_between(phases, factors['beta_min'], factors['beta_max'], color='C2',
                           alpha=0.2, label='β (min–max)')
      ax_beta.set_ylabel('β')
      handles_of.append(ax_beta)
    handles = [h for a in handles_of for h in a.get_legend_handles_labels()[0]]
    ax_factors.legend(handles, [h.get_label() for h in handles], fontsize=8)
  for ax in axes:
    ax.grid(alpha=0.3)


def plot_diagnostics(workdir: str | os.PathLike, diag: Mapping[str, np.ndarray],
                     phase: Optional[int] = None) -> str:
  """Writes ``workdir/diagnostics.png`` (the four panels of :func:`draw_panels`); returns its path."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(12, 8.5))
  FigureCanvasAgg(fig)
  draw_panels(fig.subplots(2, 2).ravel(), diag, phase)
  fig.tight_layout()
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, PLOT_FILE)
  report.atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=100), mode='wb')
  return path
