"""Seed mapping of the step functions (steps.over_seeds) and the profiler-trace summary."""

import gzip
import json
import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gr_jax import steps

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "launch"))
import trace_summary  # pylint: disable=g-import-not-at-top,wrong-import-position


def _fn(params, x, data: steps.PhaseData, scale):
  """A per-seed computation whose unbatched inputs (size, scale) are shared by all seeds."""
  y = jnp.tanh(x @ params["w"]) * scale
  return {"out": y.sum(axis=-1) + data.size, "rows": data.images.sum() + data.labels.sum()}


def _inputs(num_seeds):
  rng = np.random.default_rng(num_seeds)
  params = {"w": jnp.asarray(rng.normal(size=(num_seeds, 4, 3)), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(num_seeds, 5, 4)), jnp.float32)
  data = steps.PhaseData(jnp.asarray(rng.integers(0, 255, (num_seeds, 6, 2, 2, 3)), jnp.int32),
                         jnp.asarray(rng.integers(0, 9, (num_seeds, 6)), jnp.int32), jnp.int32(4))
  return params, x, data, jnp.float32(0.5)


AXES = (0, 0, steps.PhaseData(0, 0, None), None)


class OverSeedsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_modes_equal_per_seed_loop(self):
    for num_seeds in (1, 3):
      args = _inputs(num_seeds)
      expected = [_fn(*jax.tree.map(lambda ax, a: jax.tree.map(lambda v: v[s], a) if ax == 0
                                    else a, AXES, args, is_leaf=lambda v: v is None or
                                    isinstance(v, int)))
                  for s in range(num_seeds)]
      expected = jax.tree.map(lambda *v: jnp.stack(v), *expected)
      for mode in steps.SEED_EXECUTIONS:
        for unroll in (False, True):
          got = self.variant(steps.over_seeds(_fn, AXES, mode, unroll=unroll))(*args)
          chex.assert_trees_all_close(got, expected, rtol=1e-6)
          chex.assert_shape(got["out"], (num_seeds, 5))

  def test_keeps_the_function_name_and_rejects_unknown_modes(self):
    assert steps.over_seeds(_fn, AXES, "sequential").__name__ == "_fn"
    with pytest.raises(ValueError, match="unknown seed execution 'pmap'"):
      steps.over_seeds(_fn, AXES, "pmap")

  def test_sequential_lowers_to_a_loop_unless_unrolled_and_vmap_does_not(self):
    args = _inputs(3)
    text = lambda mode: jax.jit(steps.over_seeds(_fn, AXES, mode)).lower(*args).as_text()
    assert "while" in text("sequential") and "while" not in text("vmap")
    unrolled = jax.jit(steps.over_seeds(_fn, AXES, "sequential", unroll=True)).lower(*args)
    assert "while" not in unrolled.as_text()


def test_trace_summary_of_a_synthetic_trace(tmp_path):
  run = tmp_path / "plugins" / "profile" / "run1"
  run.mkdir(parents=True)
  events = [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
      {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7(Compute)"}},
  ]
  kernels = [("sm90_xmma_fprop_implicit_gemm_f32", 10), ("input_reduce_fusion_3", 3),
             ("loop_add_fusion", 2), ("Memset", 1)]
  ts = 0
  for _ in range(2):  # two steps
    for name, dur in kernels:
      events.append({"ph": "X", "pid": 1, "tid": 7, "name": name, "ts": ts, "dur": dur})
      ts += dur + 1  # 1 us gap after each kernel
  events.append({"ph": "X", "pid": 2, "tid": 1, "name": "host op", "ts": 0, "dur": 500})
  with gzip.open(run / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  s = trace_summary.summarize(str(tmp_path), steps=2)
  assert s["kernels_per_step"] == 4
  assert s["busy_ms_per_step"] == pytest.approx(0.016)
  assert s["span_ms_per_step"] == pytest.approx((ts - 1) / 2 / 1e3)
  assert s["categories"]["convolution (cuDNN)"]["ms_per_step"] == pytest.approx(0.010)
  assert s["categories"]["reduction fusion"]["kernels_per_step"] == 1
  assert s["categories"]["elementwise fusion"]["ms_per_step"] == pytest.approx(0.002)
  assert s["categories"]["copy/memset"]["ms_per_step"] == pytest.approx(0.001)
  assert s["top_kernels"][0]["name"].startswith("sm90_xmma_fprop")
  assert "convolution" in trace_summary.format_summary(s)
  with pytest.raises(FileNotFoundError, match="perfetto_trace"):
    trace_summary.summarize(str(tmp_path / "plugins" / "none"), steps=1)
