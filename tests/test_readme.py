"""Every ```python block of README.md runs as written, each in a fresh namespace.

No block depends on another: each imports and builds what it uses, so a reader can copy any one.
The two reweighting examples are also checked against docs/method.md §4.
"""

import functools
import pathlib
import re

import jax
import numpy as np
import pytest

from test_reweight import oracle_step

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@functools.cache
def run_block(index: int) -> dict:
  namespace = {}
  code = compile(BLOCKS[index], f"{README}, python block {index}", "exec")
  exec(code, namespace)  # pylint: disable=exec-used
  return namespace


def block_with(marker: str) -> int:
  """Index of the one block containing ``marker``."""
  hits = [i for i, block in enumerate(BLOCKS) if marker in block]
  assert len(hits) == 1, f"{len(hits)} README python blocks contain {marker!r}"
  return hits[0]


def test_readme_has_the_reweighting_examples():
  assert len(BLOCKS) >= 2, "the README's python blocks were not found"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_block_runs_on_its_own(index):
  run_block(index)


def test_gr_example_reweights():
  namespace = run_block(block_with("print(opt_state[0].class_scale)"))
  scale = np.asarray(namespace["opt_state"][0].class_scale)
  # Mean CE gradient of each logit over the batch: class 0: -0.55, class 1: -0.05, others: 0.2,
  # times the same feature vector, so α = 0.05 / |g_c| with class 1 the least updated.
  np.testing.assert_allclose(scale, [0.05 / 0.55, 1.0, 0.25, 0.25, 0.25], rtol=1e-5)


def test_dgr_example_reweights_as_method_md_says():
  ns = run_block(block_with("kd_updates=kd_grads"))
  ce, kd, pc = ns["ce_grads"], ns["kd_grads"], ns["pc"]
  old, new = np.asarray(pc.old_classes), np.asarray(pc.new_classes)
  # First step of SGD with momentum: updates = -lr · (the reweighted gradient).
  reweighted = jax.tree.map(lambda u: -np.asarray(u) / 0.1, ns["updates"])

  # The backbone gets the total (CE + KD) gradient, untouched.
  np.testing.assert_allclose(reweighted["backbone"]["kernel"],
                             ce["backbone"]["kernel"] + kd["backbone"]["kernel"], rtol=1e-5)
  # The classifier: s_c G^CE_c + β G^KD_c for old classes, s_c G^CE_c for new ones (§4).
  w, b, phi, s, beta = oracle_step(
      np.zeros(old.shape), np.asarray(ce["classifier"]["kernel"]),
      np.asarray(ce["classifier"]["bias"]), old, new, float(pc.gamma),
      np.asarray(kd["classifier"]["kernel"]), np.asarray(kd["classifier"]["bias"]))
  np.testing.assert_allclose(reweighted["classifier"]["kernel"], w, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(reweighted["classifier"]["bias"], b, rtol=1e-4, atol=1e-7)
  state = ns["opt_state"][0]
  np.testing.assert_allclose(state.cumulative_norms, phi, rtol=1e-5)
  np.testing.assert_allclose(state.class_scale, s, rtol=1e-5)
  np.testing.assert_allclose(state.kd_scale, beta, rtol=1e-5)
  # The example is not a degenerate case: KD reaches the old rows and both groups are rescaled.
  assert beta > 0 and np.any(s[old] < 1.0) and np.any(s[new] < 1.0)
