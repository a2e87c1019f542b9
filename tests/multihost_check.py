r"""One process of a multi-process CPU run of the tiny protocol (``tests/test_multihost.py``).

Run as P processes that share ``--workdir``::

  JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=<0|1> \
    python tests/multihost_check.py --data synthetic.npz --workdir W --report report_<i>.json

or without those variables as one process. It adds ``--devices_per_process`` forced host devices to
the caller's ``XLA_FLAGS``, turns on cross-process CPU collectives (gloo) and runs
``trainer.run`` on :func:`tiny_run.tiny_config`, cut to one phase of 8 classes, over all devices
of all processes; the trainer joins the processes itself (``parallel.initialize_distributed``).
``--report`` receives what the process saw: its index, the global device count, the run's results,
at each phase end the features herding got (gathered from every process), their dataset indices
and the exemplars it chose, and every file or folder it created in the workdir outside
``checkpoints/`` (a process other than 0 must create none).
"""

import argparse
import builtins
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", required=True, help="npz dataset (tiny_run.write_synthetic_npz)")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--report", required=True, help="JSON file this process writes")
  parser.add_argument("--devices_per_process", type=int, default=2)
  return parser.parse_args()


class WriteRecorder:
  """Records files opened for writing and folders made under ``workdir`` but outside its
  ``checkpoints/`` (Orbax's, written by every process)."""

  def __init__(self, workdir):
    self.workdir = os.path.abspath(workdir)
    self.paths = []
    self._open, self._os_open, self._mkdir = builtins.open, os.open, os.mkdir

  def _note(self, path):
    path = os.path.abspath(os.fspath(path))
    if path.startswith(self.workdir + os.sep) and not path.startswith(
        os.path.join(self.workdir, "checkpoints")):
      self.paths.append(os.path.relpath(path, self.workdir))

  def __enter__(self):
    def open_(file, mode="r", *args, **kwargs):
      if isinstance(file, (str, os.PathLike)) and any(m in mode for m in "wax+"):
        self._note(file)
      return self._open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
      if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
        self._note(path)
      return self._os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
      self._note(path)
      return self._mkdir(path, *args, **kwargs)

    builtins.open, os.open, os.mkdir = open_, os_open, mkdir
    return self

  def __exit__(self, *exc):
    builtins.open, os.open, os.mkdir = self._open, self._os_open, self._mkdir


def main():
  args = _parse_args()
  os.environ["XLA_FLAGS"] = " ".join(
      [f for f in os.environ.get("XLA_FLAGS", "").split()
       if not f.startswith("--xla_force_host_platform_device_count")]
      + [f"--xla_force_host_platform_device_count={args.devices_per_process}"])
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path[:0] = [REPO, os.path.join(REPO, "tests")]
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  from gr_jax import exemplars  # pylint: disable=g-import-not-at-top
  from gr_jax import trainer  # pylint: disable=g-import-not-at-top
  from tiny_run import tiny_config  # pylint: disable=g-import-not-at-top

  herding = []  # what herding got (the features gathered from every process) and chose
  select_exemplars = exemplars.select_exemplars

  def recording_select_exemplars(features, labels, ids, *args, **kwargs):
    chosen = select_exemplars(features, labels, ids, *args, **kwargs)
    herding.append({"features": features.tolist(), "ids": ids.tolist(), "chosen": chosen.tolist()})
    return chosen

  exemplars.select_exemplars = recording_select_exemplars
  config = tiny_config(args.data, **{"protocol.num_classes": 8, "protocol.nc_first_task": 8,
                                     "protocol.num_tasks": 1})
  with WriteRecorder(args.workdir) as writes:
    results = trainer.run(config, args.workdir)
  report = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "devices": jax.device_count(), "results": results,
            "herding": herding, "workdir_writes": writes.paths}
  with open(args.report, "w") as f:
    json.dump(report, f, default=str)


if __name__ == "__main__":
  main()
