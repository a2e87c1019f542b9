"""The README's code blocks run as written."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_gr_example_runs_and_reweights():
  text = README.read_text()
  section = text.split("## Use GR in your own training loop", 1)[1]
  example = re.findall(r"```python\n(.*?)```", section, re.S)[0]
  namespace = {}
  exec(compile(example, str(README), "exec"), namespace)  # pylint: disable=exec-used
  scale = np.asarray(namespace["opt_state"][0].class_scale)
  # Mean CE gradient of each logit over the batch: class 0: -0.55, class 1: -0.05, others: 0.2,
  # times the same feature vector, so α = 0.05 / |g_c| with class 1 the least updated.
  np.testing.assert_allclose(scale, [0.05 / 0.55, 1.0, 0.25, 0.25, 0.25], rtol=1e-5)
