"""Which code, software and accelerator produced a result, recorded beside the config.

A results file without this cannot say which commit or jax release its numbers came from. Runs
on a GPU are not bit-reproducible from run to run anyway (RESULTS.md), but a changed library or
a patched tree explains differences that noise does not.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Iterable
from typing import Any

COMMIT_ENV = 'GR_JAX_COMMIT'
_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy')
_SOURCE_TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commit() -> str:
  """The gr_jax commit: ``$GR_JAX_COMMIT`` where set (a copy of the tree without its ``.git``),
  else ``git describe --always --dirty`` of the checkout this package is imported from (``-dirty``
  when tracked files differ from the commit), else ``'unknown'`` (an installed wheel)."""
  if os.environ.get(COMMIT_ENV):
    return os.environ[COMMIT_ENV]
  def git(*args):
    return subprocess.run(['git', '-C', _SOURCE_TREE, *args], capture_output=True, text=True,
                          check=True, timeout=10).stdout.strip()
  try:
    # Only our own checkout: a package installed inside some other repository is not its commit.
    if os.path.realpath(git('rev-parse', '--show-toplevel')) != os.path.realpath(_SOURCE_TREE):
      return 'unknown'
    return git('describe', '--always', '--dirty', '--abbrev=7')
  except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
    return 'unknown'


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def provenance(devices: Iterable[Any] = ()) -> dict[str, Any]:
  """``{'commit', 'python', 'packages': {name: version}, 'device_kinds', 'xla_flags'}`` for
  ``results.json``. ``xla_flags`` is ``$XLA_FLAGS`` (or ``None``): flags such as
  ``--xla_gpu_deterministic_ops=true`` change the kernels and so the numbers.

  Args:
    devices: the jax devices the run used; their ``device_kind`` (e.g. ``'NVIDIA H100 80GB
      HBM3'``) is recorded, as ``results['devices']`` only names them (``cuda:0``).
  """
  return {
      'commit': commit(),
      'python': platform.python_version(),
      'packages': {p: _version(p) for p in _PACKAGES},
      'device_kinds': sorted({str(getattr(d, 'device_kind', d)) for d in devices}),
      'xla_flags': os.environ.get('XLA_FLAGS'),
  }
