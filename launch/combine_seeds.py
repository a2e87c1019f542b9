r"""Pools the results of runs that differ only in their seeds: ``python launch/combine_seeds.py
--out=results/x.json runs/seed0/results.json runs/seed1/results.json ...``.

Seeds can be trained in one program (``--config.seeds=0,1,2,3,4``) or as separate runs (in turn,
on several GPUs or hosts, or resumed across sessions); this writes one results file shaped like a
multi-seed run's: mean and ``*_std`` of every metric, ``per_seed``, the seeds and the summed wall
time. Runs with different configs (other than the seed) are refused.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from gr_jax import metrics
from gr_jax import report

_OUT = flags.DEFINE_string("out", None, "Where to write the pooled results (JSON).")
flags.mark_flag_as_required("out")


def main(argv):
  paths = argv[1:]
  if not paths:
    raise SystemExit("error: give the results.json files (or workdirs) of the runs to pool")
  try:
    pooled = report.combine_seed_results([report.load_results(path) for path in paths])
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(metrics.to_json_compatible(pooled), f, indent=1, allow_nan=False)
    f.write("\n")
  line = (f"{len(pooled['seeds'])} seeds {pooled['seeds']}: average incremental accuracy "
          f"{pooled['average_incremental_accuracy']:.2f}")
  if "average_incremental_accuracy_std" in pooled:
    line += f" ± {pooled['average_incremental_accuracy_std']:.2f}"
  print(line + f", last {pooled['last_accuracy']:.2f}")


if __name__ == "__main__":
  app.run(main)
