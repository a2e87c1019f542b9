"""A test's command-line cases side by side: each case is a fresh Python process that spends most
of its time importing JAX, so running the cases on every core at once saves most of the wait."""

import concurrent.futures
import os
import subprocess


def run_side_by_side(commands, **kwargs) -> list[subprocess.CompletedProcess]:
  """``subprocess.run(argv, capture_output=True, text=True, **kwargs)`` of every ``argv`` in
  ``commands``, as many at a time as there are cores; the results in the order of ``commands``."""
  run = lambda argv: subprocess.run(argv, capture_output=True, text=True, **kwargs)
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    return list(pool.map(run, commands))
