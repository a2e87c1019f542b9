"""The optimiser the trainer uses, as a public optax chain: GR/DGR in front of torch-style SGD."""

from typing import Any, Optional

import jax
import optax

from gr_jax.reweight import ClassifierSelector
from gr_jax.reweight import gradient_reweighting
from gr_jax.reweight import GradientReweightingState


def dgr_sgd(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9,
            weight_decay: float = 5e-4, *, classifier: ClassifierSelector,
            reweighting: bool = True,
            clip_norm: Optional[float] = None) -> optax.GradientTransformationExtraArgs:
  """SGD as the reference trains with it, behind the per-class gradient reweighting.

  ``optax.chain(gradient_reweighting(classifier), [clip_by_global_norm], add_decayed_weights,
  sgd(learning_rate, momentum))``: the classifier's gradient rows are reweighted first, then
  weight decay is added to the result and momentum SGD applied, as ``torch.optim.SGD`` does with
  ``weight_decay``. ``update`` takes the reweighting's extra arguments (``new_classes``,
  ``old_classes``, ``kd_updates``, ``gamma``; see :func:`gr_jax.gradient_reweighting`).
  Re-``init`` it at every phase (Φ restarts at 0). To change the rate between steps without
  recompiling, wrap it as optax does any optimiser:
  ``optax.inject_hyperparams(dgr_sgd, static_args=("classifier", "reweighting", "clip_norm"))``
  and set ``opt_state.hyperparams["learning_rate"]``.

  Args:
    learning_rate: SGD's rate (a float or an optax schedule).
    momentum: heavy-ball momentum (torch's convention: no dampening, not Nesterov).
    weight_decay: L2 decay added to the (reweighted) gradient.
    classifier: which params leaves are the classifier (as for ``optax.masked``).
    reweighting: False leaves the reweighting out (plain SGD: the fine-tuning baseline).
    clip_norm: clip the global gradient norm to this before weight decay (None: no clipping).
  """
  parts = [gradient_reweighting(classifier)] if reweighting else []
  if clip_norm is not None:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts += [optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum)]
  return optax.chain(*parts)


def reweighting_state(opt_state: Any) -> Optional[GradientReweightingState]:
  """The :class:`GradientReweightingState` inside an optimiser state (None if there is none)."""
  is_gr = lambda x: isinstance(x, GradientReweightingState)
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_gr) if is_gr(s)]
  return found[0] if found else None
