"""Orbax checkpoints of the whole :class:`~gr_jax.state.TrainState`, tied to the run's config.

Each checkpoint holds the state and a small JSON record (config fingerprint, wall time so far).
Orbax writes to a temporary directory and renames it when complete, so a run killed mid-save leaves
the previous checkpoint intact. A workdir that holds checkpoints of a different config is refused.
"""

import hashlib
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from gr_jax import report


def fingerprint(config_dict: dict[str, Any]) -> str:
  """A stable hash of the config entries that determine a run's results."""
  blob = json.dumps(report.experiment_config(config_dict), sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Checkpointer:
  """Saves and restores run states under ``workdir/checkpoints``, keeping the last ``keep``."""

  def __init__(self, workdir: str, config_dict: dict[str, Any], keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.fingerprint = fingerprint(config_dict)
    self._config = config_dict
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, wall_time_s: float) -> None:
    meta = {"fingerprint": self.fingerprint, "wall_time_s": wall_time_s, "config": self._config}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def restore(self, abstract_state: Any) -> tuple[Any, float] | None:
    """Returns (state, wall time so far) of the latest checkpoint, or None if there is none.

    Raises:
      ValueError: the checkpoint was written by a run with a different config.
    """
    step = self._manager.latest_step()
    if step is None:
      return None
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if meta.get("fingerprint") != self.fingerprint:
      saved = report.experiment_config(meta.get("config", {}))
      current = report.experiment_config(self._config)
      differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
      raise ValueError(
          f"the workdir {os.path.dirname(self.directory)} holds checkpoints of a different config "
          f"(differing sections: {', '.join(differing) or 'unknown'}). Use a new --workdir, or "
          "delete that workdir to start over; nothing was changed.")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"], float(meta.get("wall_time_s", 0.0))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """Shape/dtype/sharding skeleton of ``tree`` for restoring into the same layout."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
