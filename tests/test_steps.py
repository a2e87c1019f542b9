"""The train step and the optimiser chain as pure functions, and the profiler-trace summary."""

import gzip
import json
import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gr_jax
from gr_jax import models
from gr_jax import state as state_lib
from gr_jax import steps
from gr_jax.data import augment

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "launch"))
import trace_summary  # pylint: disable=g-import-not-at-top,wrong-import-position


def _tiny_step_inputs(incremental: bool):
  """A ResNet-8 over 6 classes (3 old, 3 new in phase 1), its optimiser, and two batches."""
  model = models.create_model("resnet8", 6)
  tx = optax.inject_hyperparams(gr_jax.dgr_sgd, static_args=("classifier", "reweighting",
                                                              "clip_norm"))(
      learning_rate=0.1, momentum=0.9, weight_decay=5e-4, classifier=models.classifier_mask)
  run = state_lib.create_run_state(model, tx, jax.random.key(0), (32, 32, 3), 2, 6, 4)
  consts = gr_jax.phase_constants(np.array([40, 20, 5, 30, 10, 4]), 3 if incremental else 0,
                                  3 if incremental else 3, 4)
  rng = np.random.default_rng(0)
  batches = [steps.Batch(jnp.asarray(rng.integers(0, 256, (8, 32, 32, 3)), jnp.uint8),
                         jnp.asarray(rng.integers(0, 6 if incremental else 3, (8,)), jnp.int32),
                         jnp.arange(8) < 7) for _ in range(2)]
  _, test_aug = augment.get_augmentation("cifar", 32)
  train_aug = lambda key, x: test_aug(x)
  return model, tx, run, consts, batches, train_aug


@pytest.mark.parametrize("incremental", [False, True])
def test_train_step_is_a_pure_state_to_state_function_compiled_once(incremental):
  model, tx, run, consts, batches, train_aug = _tiny_step_inputs(incremental)
  method = steps.Method()
  chex.clear_trace_counter()  # the counter is keyed by the code, shared by both parametrisations

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(state, batch, key):
    return steps.train_step(state, batch, key, (run.teacher_params, run.teacher_batch_stats),
                            consts, model=model, tx=tx, method=method, augment=train_aug,
                            incremental=incremental)

  state = run.train
  for i, batch in enumerate(batches):  # a second batch reuses the compiled step
    before = state
    state, metrics = step(state, batch, jax.random.key(i))
    assert int(state.step) == i + 1
    assert float(metrics["examples"]) == 7.0 and np.isfinite(float(metrics["loss_ce"]))
    assert (float(metrics["loss_kd"]) > 0) == incremental
    # The input state is not modified (immutable pytrees); the classifier moved.
    assert not np.allclose(before.params["classifier"]["kernel"],
                           state.params["classifier"]["kernel"])
  gr = gr_jax.optim.reweighting_state(state.opt_state)
  seen = 6 if incremental else 3  # unseen classes get no gradient, so Φ stays 0 for them
  phi = np.asarray(gr.cumulative_norms)
  assert np.all(phi[:seen] > 0) and np.all(phi[seen:] == 0)


def test_dgr_sgd_is_the_chain_it_documents():
  """reweighting → weight decay → momentum SGD; injecting the rate changes nothing else."""
  params = {"backbone": {"kernel": jnp.full((4, 3), 0.5)},
            "classifier": {"kernel": jnp.arange(12.0).reshape(3, 4) / 10, "bias": jnp.zeros(4)}}
  grads = jax.tree.map(lambda p: jnp.cos(p) + 0.1, params)
  mask = {"backbone": False, "classifier": True}
  direct = gr_jax.dgr_sgd(0.05, 0.9, 1e-3, classifier=mask)
  manual = optax.chain(gr_jax.gradient_reweighting(mask), optax.add_decayed_weights(1e-3),
                       optax.sgd(0.05, momentum=0.9))
  injected = optax.inject_hyperparams(gr_jax.dgr_sgd, static_args=("classifier", "reweighting",
                                                                    "clip_norm"))(
      learning_rate=0.0, momentum=0.9, weight_decay=1e-3, classifier=mask)
  injected_state = injected.init(params)
  injected_state.hyperparams["learning_rate"] = jnp.asarray(0.05)
  outputs = []
  for tx, state in ((direct, direct.init(params)), (manual, manual.init(params)),
                    (injected, injected_state)):
    new_class = jnp.array([True, True, False, False])
    for _ in range(2):
      updates, state = tx.update(grads, state, params, new_classes=new_class)
    outputs.append(updates)
  chex.assert_trees_all_close(outputs[0], outputs[1], rtol=1e-6)
  chex.assert_trees_all_close(outputs[0], outputs[2], rtol=1e-6)
  plain = gr_jax.dgr_sgd(0.05, 0.9, 1e-3, classifier=mask, reweighting=False, clip_norm=1.0)
  assert gr_jax.optim.reweighting_state(plain.init(params)) is None


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
