"""Orbax checkpoints of a run's whole :class:`~gr_jax.state.RunState`, tied to its config and data.

Each checkpoint holds the state and a small JSON record (fingerprint, config, data digest, wall
time so far). Orbax writes to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact. A workdir that holds checkpoints of a different
config or of other data is refused; the same data at another path resumes.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from gr_jax import config as config_lib


class Checkpointer:
  """Saves and restores run states under ``workdir/checkpoints``, keeping the last ``keep``.

  Checkpoints are keyed by :func:`gr_jax.config.fingerprint`: the config entries that determine
  results and ``data_digest`` (:func:`gr_jax.data.sources.dataset_digest`), so a run resumes
  wherever its data has moved.
  """

  def __init__(self, workdir: str, config_dict: dict[str, Any], data_digest: str, keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.fingerprint = config_lib.fingerprint(config_dict, data_digest)
    self._config = config_dict
    self._data_digest = data_digest
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, wall_time_s: float) -> None:
    meta = {"fingerprint": self.fingerprint, "wall_time_s": wall_time_s, "config": self._config,
            "data_digest": self._data_digest}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def restore(self, abstract_state: Any) -> tuple[Any, float] | None:
    """Returns (state, wall time so far) of the latest checkpoint, or None if there is none.

    Raises:
      ValueError: the checkpoint was written by a run with a different config or other data.
    """
    step = self._manager.latest_step()
    if step is None:
      return None
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if meta.get("fingerprint") != self.fingerprint:
      raise ValueError(self._mismatch(meta))
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"], float(meta.get("wall_time_s", 0.0))

  def _mismatch(self, meta: dict[str, Any]) -> str:
    """What differs between a refused checkpoint's run and this one, and what to do."""
    saved = config_lib.results_config(meta.get("config", {}), data_location=False)
    current = config_lib.results_config(self._config, data_location=False)
    differing = [f"{key} {was!r}, now {now!r}"
                 for key, (was, now) in config_lib.differences(saved, current).items()]
    other_data = meta.get("data_digest") != self._data_digest
    if other_data:
      differing.append(f"the data's content (digest {meta['data_digest']}, now {self._data_digest})")
    return (f"the workdir {os.path.dirname(self.directory)} holds checkpoints of a different run "
            f"(differing: {'; '.join(differing) or 'unknown'}). Use a new --workdir, "
            + ("or point the config at the run's data, " if other_data else
               "or rerun with the saved run's settings, ")
            + "or delete that workdir to start over; nothing was changed.")

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """Shape/dtype/sharding skeleton of ``tree`` for restoring into the same layout."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
