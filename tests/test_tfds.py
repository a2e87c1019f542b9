"""The tfds source on tfds' real builders and on datasets that tfds itself prepared on disk.

No network and no mocks: a dataset is prepared by tfds' own builder class (its split definitions,
archive extraction, parsing and record writing), fed a small local archive in the dataset's
original format in place of the download; the loader then reads what tfds wrote.
"""

import json
import os
import pathlib
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image
import pytest

from gr_jax.data import sources

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
FOOD101_URL = "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz"


@pytest.fixture(scope="module")
def tfds():
  return pytest.importorskip("tensorflow_datasets")


def _tar_gz(tree: pathlib.Path, archive: pathlib.Path) -> pathlib.Path:
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(tree, arcname=tree.name)
  return archive


def _prepare(tfds, name: str, data_dir: pathlib.Path, archive: pathlib.Path) -> None:
  """Prepares tfds' dataset ``name`` in ``data_dir`` from ``archive``, its one download."""
  builder_cls = tfds.builder_cls(name)
  (url,) = builder_cls.url_infos  # The archive the real builder downloads.

  class _Downloaded:
    """The builder's download manager, with its archive already downloaded."""

    def __init__(self, dl_manager):
      self._dl_manager = dl_manager

    def download_and_extract(self, requested):
      assert requested == url
      return self._dl_manager.extract(archive)  # tfds' own extraction.

  class Local(builder_cls, skip_registration=True):
    name = builder_cls.name

    def _split_generators(self, dl_manager):
      return super()._split_generators(_Downloaded(dl_manager))

  Local(data_dir=str(data_dir)).download_and_prepare()


def _cifar100_archive(directory: pathlib.Path, splits: dict, fine_names, coarse_names):
  """``splits`` (``train``/``test`` -> images, fine labels, coarse labels) written as
  ``cifar-100-binary.tar.gz``: per image a coarse and a fine label byte, then R, G, B planes."""
  root = directory / "cifar-100-binary"
  root.mkdir(parents=True)
  for split, (x, y, y_coarse) in splits.items():
    planes = np.asarray(x, np.uint8).transpose(0, 3, 1, 2).reshape(len(x), -1)
    records = np.concatenate([np.c_[y_coarse, y].astype(np.uint8), planes], axis=1)
    (root / f"{split}.bin").write_bytes(records.tobytes())
  (root / "fine_label_names.txt").write_text("\n".join(fine_names) + "\n")
  (root / "coarse_label_names.txt").write_text("\n".join(coarse_names) + "\n")
  return _tar_gz(root, directory / "cifar-100-binary.tar.gz")


def _check_loads_back(data_dir: pathlib.Path, splits: dict, fine_names) -> None:
  data = sources.load_dataset("tfds", name="cifar100", data_dir=str(data_dir), download=False)
  assert data.name == "cifar100" and data.class_names == tuple(fine_names)
  for split, (x, y, _) in splits.items():
    loaded_x, loaded_y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
    assert isinstance(loaded_x, np.ndarray) and loaded_x.dtype == np.uint8
    # Same images and labels in the same (original file) order, not tfds' shuffled record order.
    np.testing.assert_array_equal(loaded_x, x)
    np.testing.assert_array_equal(loaded_y, y)


# --- the real builders ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, image_shape, num_classes, url", [
    ("cifar100", (32, 32, 3), 100, CIFAR100_URL),
    ("food101", (None, None, 3), 101, FOOD101_URL),
])
def test_real_builder_without_network(tfds, tmp_path, name, image_shape, num_classes, url):
  builder = tfds.builder(name, data_dir=str(tmp_path))
  image, label = builder.info.features["image"], builder.info.features["label"]
  assert image.shape == image_shape and image.np_dtype == np.uint8
  assert label.num_classes == num_classes
  # Its registered download: tfds finds the checksums beside the builder's code, through
  # importlib_resources (what the [tfds] extra must provide).
  assert list(builder.url_infos) == [url]
  assert not builder.is_prepared()


def test_cifar100_prepared_by_tfds_from_real_images(tfds, tmp_path, cifar100_npz):
  """A few real CIFAR-100 images of three classes, prepared as tfds' ``cifar100``, load back."""
  with np.load(cifar100_npz) as npz:
    fine_names, coarse_names = list(npz["fine_label_names"]), list(npz["coarse_label_names"])
    splits = {}
    for split, per_class in (("train", 4), ("test", 2)):
      y = npz[f"y_{split}"]
      idx = np.sort(np.concatenate([np.flatnonzero(y == c)[:per_class] for c in (0, 19, 99)]))
      splits[split] = (npz[f"x_{split}"][idx], y[idx], npz[f"y_{split}_coarse"][idx])
  _prepare(tfds, "cifar100", tmp_path / "tfds",
           _cifar100_archive(tmp_path / "download", splits, fine_names, coarse_names))
  assert set(tfds.builder("cifar100", data_dir=str(tmp_path / "tfds")).info.splits) == {
      "train", "test"}
  _check_loads_back(tmp_path / "tfds", splits, fine_names)


def test_cifar100_prepared_by_tfds_from_synthetic_images(tfds, tmp_path):
  rng = np.random.default_rng(0)
  splits = {split: (rng.integers(0, 256, (n, 32, 32, 3), np.uint8), rng.integers(0, 100, n),
                    rng.integers(0, 20, n))
            for split, n in (("train", 7), ("test", 3))}
  fine_names = [f"fine{i}" for i in range(100)]
  _prepare(tfds, "cifar100", tmp_path / "tfds",
           _cifar100_archive(tmp_path / "download", splits, fine_names,
                             [f"coarse{i}" for i in range(20)]))
  _check_loads_back(tmp_path / "tfds", splits, fine_names)


def test_food101_prepared_by_tfds_stays_encoded(tfds, tmp_path):
  """Food-101's JPEGs of varying size: kept encoded, decoded at image_size; 'validation' is the
  test split."""
  root = tmp_path / "download" / "food-101"
  classes = list(tfds.builder("food101").info.features["label"].names[:2])
  rng = np.random.default_rng(0)
  meta, files = {}, {}
  for split, per_class in (("train", 3), ("test", 1)):
    meta[split] = {c: [f"{c}/{split}{k}" for k in range(per_class)] for c in classes}
    files[split] = {}
    for label, image_names in enumerate(meta[split].values()):
      for image_name in image_names:
        path = root / "images" / f"{image_name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = tuple(int(s) for s in rng.integers(20, 48, 2))
        Image.fromarray(rng.integers(0, 256, size + (3,), np.uint8)).save(path)
        files[split][path.read_bytes()] = (path, label)
  (root / "meta").mkdir()
  for split in meta:
    (root / "meta" / f"{split}.json").write_text(json.dumps(meta[split]))
  _prepare(tfds, "food101", tmp_path / "tfds", _tar_gz(root, tmp_path / "food-101.tar.gz"))

  data = sources.load_dataset("tfds", name="food101", data_dir=str(tmp_path / "tfds"),
                              image_size=16, download=False)
  assert data.num_classes == 101 and data.class_names[:2] == tuple(classes)
  for split, tfds_split in (("train", "train"), ("test", "validation")):
    loaded, labels = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
    assert isinstance(loaded, sources.LazyImages) and loaded.shape == (len(files[split]), 16, 16, 3)
    # tfds keeps each JPEG file's bytes (this version of food101 has no id to order them by).
    assert sorted(loaded.sources) == sorted(files[split])
    for i, encoded in enumerate(loaded.sources):
      path, label = files[split][encoded]
      assert labels[i] == label
      np.testing.assert_array_equal(loaded[i], sources.decode_image(str(path), 16))
    assert len(labels) == tfds.builder("food101", data_dir=str(tmp_path / "tfds")).info.splits[
        tfds_split].num_examples


# --- errors ---------------------------------------------------------------------------------------


def test_unknown_dataset_names(tfds):
  del tfds
  with pytest.raises(ValueError, match="unknown tfds dataset 'no_such_dataset_xyz'"):
    sources.load_dataset("tfds", name="no_such_dataset_xyz")
  # A near miss gets tfds's suggestion, not its list of every dataset.
  with pytest.raises(ValueError, match="Did you mean: cifar1000 -> cifar100") as err:
    sources.load_dataset("tfds", name="cifar1000")
  assert len(str(err.value).splitlines()) == 1
  with pytest.raises(ValueError, match="needs a dataset name"):
    sources.load_dataset("tfds")


def test_not_prepared_without_download_is_one_line(tfds, tmp_path):
  del tfds
  with pytest.raises(FileNotFoundError) as err:
    sources.load_dataset("tfds", name="cifar100", data_dir=str(tmp_path), download=False)
  message = str(err.value)
  assert len(message.splitlines()) == 1
  assert f"'cifar100' is not prepared in {tmp_path} and download is off" in message
  assert "--config.data.download=True" in message
  assert "--config.data.source=npz --config.data.path=" in message


@pytest.fixture(scope="module")
def unreachable_cifar100(tfds):
  """A registered dataset (tfds' cifar100 with another download) whose download cannot work."""
  from tensorflow_datasets.image_classification import cifar  # pylint: disable=g-import-not-at-top

  class GrJaxTestUnreachableCifar100(cifar.Cifar100):
    URL = "file:///nonexistent/cifar-100-binary.tar.gz"  # tfds copies it with tf.io.gfile: fails.

    @property
    def _cifar_info(self):
      return super()._cifar_info._replace(url=self.URL)

  return GrJaxTestUnreachableCifar100


def test_offline_download_is_one_line_at_once(unreachable_cifar100, tmp_path, monkeypatch):
  """No download host resolves (as offline): one error line, without tfds' minutes of retries."""
  for var in [v for v in os.environ if v.lower().endswith("_proxy")]:
    monkeypatch.delenv(var)  # A proxy would resolve the host itself.
  unresolvable = "https://gr-jax-test.invalid/cifar-100-binary.tar.gz"  # RFC 6761: never resolves.
  monkeypatch.setattr(unreachable_cifar100, "URL", unresolvable)
  monkeypatch.setattr(unreachable_cifar100, "url_infos", {unresolvable: None})
  with pytest.raises(FileNotFoundError) as err:
    sources.load_dataset("tfds", name=unreachable_cifar100.name, data_dir=str(tmp_path))
  message = str(err.value)
  assert len(message.splitlines()) == 1
  assert (f"is not prepared in {tmp_path} and cannot be downloaded: no network (cannot resolve "
          "gr-jax-test.invalid)") in message
  assert "--config.data.source=npz --config.data.path=" in message
  assert f"copy DIR to {tmp_path}" in message


def test_failed_download_is_one_line(unreachable_cifar100, tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    sources.load_dataset("tfds", name=unreachable_cifar100.name, data_dir=str(tmp_path))
  message = str(err.value)
  assert len(message.splitlines()) == 1
  assert f"is not prepared in {tmp_path} and downloading and preparing it failed (" in message
  assert "file:///nonexistent" in message and "--config.data.source=npz" in message


# --- tfds' ImageFolder and machines without TensorFlow --------------------------------------------


def test_tfds_image_folder_matches_folder_source(tfds, tiny_imagenet_dir):
  """tfds' ImageFolder on the offline copy gives the same labels, names and pixels as ``folder``."""
  tf = pytest.importorskip("tensorflow")
  tiny = sources.load_dataset("folder", path=str(tiny_imagenet_dir))
  builder = tfds.folder_dataset.ImageFolder(str(tiny_imagenet_dir))
  assert builder.info.features["label"].names == list(tiny.class_names)
  assert builder.info.splits["train"].num_examples == len(tiny.y_train)
  assert builder.info.splits["test"].num_examples == len(tiny.y_test)
  position = {p: i for i, p in enumerate(tiny.x_train.sources)}

  # Default tfds decoding (TF's fast integer IDCT) is within a few grey levels of PIL's.
  for ex in tfds.as_numpy(builder.as_dataset(split="train").take(4)):
    i = position[ex["image/filename"].decode()]
    assert ex["label"] == tiny.y_train[i]
    diff = np.abs(ex["image"].astype(int) - tiny.x_train[i].astype(int))
    assert diff.max() <= 8 and diff.mean() < 2

  # With the accurate IDCT (what PIL uses) the pixels are identical.
  accurate = tfds.decode.make_decoder()(
      lambda serialized, feature: tf.io.decode_jpeg(serialized, channels=3,
                                                    dct_method="INTEGER_ACCURATE"))
  ds = builder.as_dataset(split="train", decoders={"image": accurate()}).take(4)
  for ex in tfds.as_numpy(ds):
    i = position[ex["image/filename"].decode()]
    assert ex["label"] == tiny.y_train[i]
    np.testing.assert_array_equal(ex["image"], tiny.x_train[i])


def test_without_tfds_extra(tmp_path):
  """The GPU machines have no TensorFlow: npz works, and tfds is one MissingExtraError line that
  names the missing module and the extra, for each module of the extra."""
  npz = tmp_path / "tiny.npz"
  np.savez(npz, x_train=np.zeros((2, 4, 4, 3), np.uint8), y_train=np.array([0, 1]),
           x_test=np.zeros((1, 4, 4, 3), np.uint8), y_test=np.array([1]))
  missing = ("tensorflow", "tensorflow_datasets", "importlib_resources")
  code = (
      "import sys\n"
      "from gr_jax.data import sources\n"
      f"for module in {missing!r}:\n"
      "  sys.modules[module] = None\n"  # Any import of it now raises ImportError.
      f"  assert sources.load_dataset('npz', path={str(npz)!r}).x_train.shape == (2, 4, 4, 3)\n"
      "  try:\n"
      "    sources.load_dataset('tfds', name='cifar100')\n"
      "  except sources.MissingExtraError as e:\n"
      "    print(e)\n"
      "  del sys.modules[module]\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=str(pathlib.Path(__file__).resolve().parents[1]), timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.splitlines() == [
      f"data.source 'tfds' needs the [tfds] extra (tensorflow, tensorflow-datasets, "
      f"importlib-resources; missing: {module}): pip install -e '.[tfds]' in the checkout; "
      "without them use the npz, folder or list source" for module in missing]
