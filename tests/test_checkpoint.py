"""Checkpoints are keyed by the config and the data's content, not by where the data lives."""

import numpy as np
import pytest

from gr_jax import checkpoint
from gr_jax.data import sources


def _config(path):
  return {"model": "resnet8", "seed": 0, "optim": {"learning_rate": 0.1},
          "data": {"source": "npz", "name": "cifar100", "path": path, "data_dir": None}}


def _dataset(pixel=0, label_shift=0):
  x = np.full((6, 4, 4, 3), pixel, np.uint8)
  y = (np.arange(6, dtype=np.int32) + label_shift) % 3
  return sources.Dataset("toy", x, y, x[:3], y[:3], ("a", "b", "c"))


def _save(workdir, config, digest):
  saver = checkpoint.Checkpointer(str(workdir), config, data_digest=digest)
  saver.save(1, {"w": np.arange(4.0)}, wall_time_s=12.5)
  saver.close()


def _restore(workdir, config, digest):
  restorer = checkpoint.Checkpointer(str(workdir), config, data_digest=digest)
  try:
    return restorer.restore({"w": np.zeros(4)})
  finally:
    restorer.close()


def test_dataset_digest_follows_content_not_location():
  digest = sources.dataset_digest(_dataset())
  assert digest == sources.dataset_digest(_dataset())
  assert digest != sources.dataset_digest(_dataset(pixel=1))
  assert digest != sources.dataset_digest(_dataset(label_shift=1))


def test_dataset_digest_of_real_images(cifar100_npz, tmp_path):
  moved = tmp_path / "cifar100.npz"
  moved.symlink_to(cifar100_npz)
  data = sources.load_dataset("npz", path=str(cifar100_npz), name="cifar100")
  digest = sources.dataset_digest(data)
  assert digest == sources.dataset_digest(sources.load_dataset("npz", path=str(moved)))
  x_train = np.array(data.x_train)
  x_train[0, 0, 0, 0] ^= 1  # one bit of one (sampled) image
  edited = sources.Dataset(data.name, x_train, data.y_train, data.x_test, data.y_test,
                           data.class_names)
  assert sources.dataset_digest(edited) != digest


def test_run_resumes_after_its_data_moved(tmp_path):
  digest = sources.dataset_digest(_dataset())
  _save(tmp_path, _config("/old/place/cifar100.npz"), digest)
  state, wall = _restore(tmp_path, _config("/new/place/cifar100.npz"), digest)
  np.testing.assert_array_equal(state["w"], np.arange(4.0))
  assert wall == 12.5


def test_other_data_or_config_is_refused_and_nothing_changes(tmp_path):
  digest = sources.dataset_digest(_dataset())
  _save(tmp_path, _config("/data/cifar100.npz"), digest)
  before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  other_data = sources.dataset_digest(_dataset(pixel=7))
  with pytest.raises(ValueError, match=r"data's content \(digest .*, now .*\).*new --workdir"):
    _restore(tmp_path, _config("/data/cifar100.npz"), other_data)
  other_config = dict(_config("/data/cifar100.npz"), optim={"learning_rate": 0.05})
  with pytest.raises(ValueError, match=r"differing: optim.learning_rate 0.1, now 0.05\)"):
    _restore(tmp_path, other_config, digest)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
