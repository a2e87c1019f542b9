r"""GPU kernel time of a JAX profiler trace, by category: ``python launch/trace_summary.py DIR [STEPS]``.

Reads the newest ``perfetto_trace.json.gz`` under ``DIR`` (``jax.profiler.start_trace(DIR,
create_perfetto_trace=True)``), takes the GPU compute stream with the most kernels and reports, per
training step: kernel count, busy time (sum of kernel durations), span (first kernel start to last
kernel end) and busy / span, and the busy time split into convolutions (cuDNN), reductions,
elementwise fusions, matrix products and copies, plus the most expensive kernels. Busy / span near
1 means the GPU executes kernels back to back (the kernels themselves limit the step); a low value
means it waits for the host (launches, synchronisation).
"""

import collections
import glob
import gzip
import json
import os
import sys
from typing import Any

_CATEGORIES = (
    ("copy/memset", ("memcpy", "memset")),
    ("convolution (cuDNN)", ("xmma_fprop", "xmma_dgrad", "xmma_wgrad", "cudnn", "convolve",
                             "wgrad", "dgrad", "fprop", "implicit_gemm", "conv")),
    ("matmul (cuBLAS)", ("gemm", "cublas", "gemv")),
    ("reduction fusion", ("reduce", "reduction")),
    ("elementwise fusion", ("fusion", "loop_", "input_")),
)


def categorize(kernel_name: str) -> str:
  name = kernel_name.lower()
  for category, keys in _CATEGORIES:
    if any(k in name for k in keys):
      return category
  return "other"


def _load_events(trace_dir: str) -> list[dict[str, Any]]:
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                           recursive=True), key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}: trace with "
                            "jax.profiler.start_trace(dir, create_perfetto_trace=True)")
  with gzip.open(paths[-1]) as f:
    events = json.load(f)
  return events["traceEvents"] if isinstance(events, dict) else events


def summarize(trace_dir: str, steps: int, top: int = 12) -> dict[str, Any]:
  """Per-step kernel statistics of the GPU compute stream (see the module docstring)."""
  events = _load_events(trace_dir)
  meta = lambda kind: {(e["pid"], e.get("tid")) if kind == "thread_name" else e["pid"]:
                       e["args"]["name"] for e in events
                       if e.get("ph") == "M" and e.get("name") == kind}
  processes, threads = meta("process_name"), meta("thread_name")
  gpus = {pid for pid, name in processes.items() if "gpu" in name.lower()}
  kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpus and "dur" in e]
  if not kernels:
    raise ValueError(f"no GPU kernels in the trace under {trace_dir} (processes: "
                     f"{sorted(processes.values())})")
  per_thread = collections.Counter((e["pid"], e["tid"]) for e in kernels)
  streams = [t for t, _ in per_thread.most_common()
             if "stream" in threads.get(t, "").lower()] or [t for t, _ in per_thread.most_common()]
  stream = streams[0]
  ks = sorted((e for e in kernels if (e["pid"], e["tid"]) == stream), key=lambda e: e["ts"])
  busy = sum(e["dur"] for e in ks)
  span = ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]
  by_category = collections.defaultdict(lambda: [0, 0.0])
  by_name = collections.defaultdict(lambda: [0, 0.0])
  for e in ks:
    for table, key in ((by_category, categorize(e["name"])), (by_name, e["name"][:100])):
      table[key][0] += 1
      table[key][1] += e["dur"]
  us_per_step = lambda us: round(us / steps / 1e3, 4)  # microseconds total -> ms per step
  return {
      "stream": threads.get(stream, str(stream)),
      "steps": steps,
      "kernels_per_step": round(len(ks) / steps, 1),
      "busy_ms_per_step": us_per_step(busy),
      "span_ms_per_step": us_per_step(span),
      "busy_fraction": round(busy / span, 4),
      "categories": {c: {"kernels_per_step": round(n / steps, 1), "ms_per_step": us_per_step(d),
                         "fraction_of_busy": round(d / busy, 4)}
                     for c, (n, d) in sorted(by_category.items(), key=lambda x: -x[1][1])},
      "top_kernels": [{"name": k, "per_step": round(n / steps, 1), "mean_us": round(d / n, 2),
                       "ms_per_step": us_per_step(d)}
                      for k, (n, d) in sorted(by_name.items(), key=lambda x: -x[1][1])[:top]],
  }


def format_summary(summary: dict[str, Any]) -> str:
  lines = [f"GPU stream {summary['stream']}: {summary['kernels_per_step']} kernels/step, busy "
           f"{summary['busy_ms_per_step']:.3f} ms of a {summary['span_ms_per_step']:.3f} ms step "
           f"({summary['busy_fraction']:.0%})"]
  for category, c in summary["categories"].items():
    lines.append(f"  {category:22s} {c['kernels_per_step']:7.1f} kernels  {c['ms_per_step']:.3f} ms"
                 f"  {c['fraction_of_busy']:6.1%}")
  lines.append("  top kernels:")
  for k in summary["top_kernels"]:
    lines.append(f"    {k['ms_per_step']:.3f} ms  {k['per_step']:5.1f}× {k['mean_us']:6.1f} us  "
                 f"{k['name'][:80]}")
  return "\n".join(lines)


if __name__ == "__main__":
  if len(sys.argv) not in (2, 3):
    sys.exit(__doc__.splitlines()[0])
  print(format_summary(summarize(sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else 1)))
