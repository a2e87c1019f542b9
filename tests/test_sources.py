"""Dataset sources on the real shared data: npz, folder, list (tfds: test_tfds.py)."""

import logging
import os
import pathlib
import zipfile

import numpy as np
from PIL import Image
import pytest

from gr_jax.data import protocol
from gr_jax.data import sources


@pytest.fixture(scope="module")
def cifar(cifar100_npz):
  return sources.load_dataset("npz", path=str(cifar100_npz), name="cifar100")


@pytest.fixture(scope="module")
def tiny(tiny_imagenet_dir):
  return sources.load_dataset("folder", path=str(tiny_imagenet_dir))


# --- npz ------------------------------------------------------------------------------------------


def test_npz_cifar100(cifar):
  assert cifar.name == "cifar100" and cifar.num_classes == 100
  assert cifar.x_train.shape == (50000, 32, 32, 3) and cifar.x_train.dtype == np.uint8
  assert cifar.x_test.shape == (10000, 32, 32, 3) and cifar.x_test.dtype == np.uint8
  assert cifar.y_train.dtype == np.int32 and cifar.y_test.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(cifar.y_train), np.full(100, 500))
  np.testing.assert_array_equal(np.bincount(cifar.y_test), np.full(100, 100))
  assert cifar.class_names[:3] == ("apple", "aquarium_fish", "baby")
  assert cifar.image_shape == (32, 32, 3)
  # Official order: the first training image is a cattle (label 19), the first test image a
  # mountain (49).
  assert cifar.y_train[0] == 19 and cifar.y_test[0] == 49
  # Published CIFAR-100 per-channel train mean (0.5071, 0.4866, 0.4409).
  mean = cifar.x_train.reshape(-1, 3).mean(0, dtype=np.float64) / 255.0
  np.testing.assert_allclose(mean, [0.5071, 0.4866, 0.4409], atol=5e-4)
  with pytest.raises(ValueError):
    cifar.y_train[0] = 3  # Read-only.


def test_npz_errors(tmp_path):
  bad = tmp_path / "bad.npz"
  np.savez(bad, x_train=np.zeros((2, 4, 4, 3), np.uint8), y_train=np.zeros(2, np.int64))
  with pytest.raises(ValueError, match=r"lacks arrays \['x_test', 'y_test'\]"):
    sources.load_dataset("npz", path=str(bad))
  gray = tmp_path / "gray.npz"
  np.savez(gray, x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.zeros(2, np.int64),
           x_test=np.zeros((1, 4, 4), np.uint8), y_test=np.zeros(1, np.int64))
  with pytest.raises(ValueError, match=r"x_train must be uint8 \[N, H, W, 3\]"):
    sources.load_dataset("npz", path=str(gray))
  missing = tmp_path / "nowhere" / "cifar.npz"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    sources.load_dataset("npz", path=str(missing))
  ok = tmp_path / "ok.npz"
  np.savez(ok, x_train=np.zeros((2, 4, 4, 3), np.uint8), y_train=np.array([0, 1]),
           x_test=np.zeros((1, 4, 4, 3), np.uint8), y_test=np.array([1]))
  small = sources.load_dataset("npz", path=str(ok))
  assert small.name == "ok" and small.class_names == ("0", "1")
  with pytest.raises(ValueError, match="image_size=8 is not applied to npz"):
    sources.load_dataset("npz", path=str(ok), image_size=8)


def test_unknown_source_and_missing_paths(tmp_path):
  with pytest.raises(ValueError, match="unknown data.source 'foo': expected one of tfds, npz, "
                     "folder, list"):
    sources.load_dataset("foo", path="x")
  with pytest.raises(ValueError, match="needs path="):
    sources.load_dataset("folder")
  missing = tmp_path / "no-such-folder"
  with pytest.raises(FileNotFoundError, match=f"{missing}.*train/<class>"):
    sources.load_dataset("folder", path=str(missing))
  (tmp_path / "half" / "train" / "a").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="has no test/ sub-folder"):
    sources.load_dataset("folder", path=str(tmp_path / "half"))
  with pytest.raises(FileNotFoundError, match=f"{missing}.*train.txt"):
    sources.load_dataset("list", path=str(missing))
  with pytest.raises(ValueError, match="image_size must be a positive integer"):
    sources.load_dataset("folder", path=str(missing), image_size=0)


# --- folder ---------------------------------------------------------------------------------------


def test_folder_tiny_imagenet(tiny, tiny_imagenet_dir):
  assert tiny.name == "tiny-imagenet-101" and tiny.num_classes == 101
  assert len(tiny.x_train) == 10100 and len(tiny.x_test) == 5050
  assert tiny.x_train.shape == (10100, 64, 64, 3) and tiny.x_train.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(tiny.y_train), np.full(101, 100))
  np.testing.assert_array_equal(np.bincount(tiny.y_test), np.full(101, 50))
  assert list(tiny.class_names) == sorted(os.listdir(tiny_imagenet_dir / "train"))
  assert tiny.class_names[0] == "n01443537"
  # Labels follow the class folder of each file.
  for i in (0, 99, 100, 5555, 10099):
    assert pathlib.Path(tiny.x_train.sources[i]).parent.name == tiny.class_names[tiny.y_train[i]]
  # Lazy decode of a handful (int array, int, slice, mask) matches a direct PIL decode.
  idx = np.array([0, 4321, 10099, 17, 2500, 9000])
  batch = tiny.x_train[idx]
  assert batch.shape == (6, 64, 64, 3) and batch.dtype == np.uint8
  for k, i in enumerate(idx):
    direct = np.asarray(Image.open(tiny.x_train.sources[i]).convert("RGB"))
    np.testing.assert_array_equal(batch[k], direct)
  np.testing.assert_array_equal(tiny.x_train[4321], batch[1])
  np.testing.assert_array_equal(tiny.x_train[-1], batch[2])
  np.testing.assert_array_equal(tiny.x_test[3:5], tiny.x_test[np.array([3, 4])])
  assert batch.std() > 10  # Real photos, not blank.
  sub = tiny.x_train.subset(idx)
  assert len(sub) == 6
  np.testing.assert_array_equal(np.asarray(sub), batch)
  with pytest.raises(IndexError):
    tiny.x_train[np.array([10100])]


def test_log_lines_name_the_folder_read_not_the_config_name(tiny_imagenet_dir, caplog):
  """configs/food101.py pointed at the Tiny-ImageNet-101 proxy: the source's line names the folder
  read and gives 'food101' only as the dataset's name; the plan's line names the class order, not
  the dataset. Without a name of its own the folder's name is not repeated."""
  with caplog.at_level(logging.INFO, logger="absl"):
    data = sources.load_dataset("folder", name="food101", path=str(tiny_imagenet_dir),
                                image_size=32)
    protocol.make_plan(data.y_train, data.y_test, dataset_name=data.name, scenario="shuffled",
                       profile="exponential", rho=0.01, nc_first_task=51, num_tasks=6,
                       val_fraction=0.1, seed=1993)
    sources.load_dataset("folder", path=str(tiny_imagenet_dir), image_size=32)
  lines = [r.getMessage() for r in caplog.records if r.name == "absl"]
  assert lines[0] == (f"folder {tiny_imagenet_dir} (ImageFolder, 101 classes): 10100 train / 5050 "
                      "test images, stored (32, 32, 3); dataset name 'food101'")
  assert lines[1].startswith("plan (shuffled, exponential rho=0.01, class order: permutation seed "
                             "1993): 101 classes in phases (51, 10, 10, 10, 10, 10)")
  assert lines[2] == (f"folder {tiny_imagenet_dir} (ImageFolder, 101 classes): 10100 train / 5050 "
                      "test images, stored (32, 32, 3)")
  assert len(lines) == 3


def test_folder_resize(tiny_imagenet_dir, tiny):
  resized = sources.load_dataset("folder", path=str(tiny_imagenet_dir), image_size=32)
  assert resized.x_train.shape == (10100, 32, 32, 3)
  np.testing.assert_array_equal(resized.y_train, tiny.y_train)
  img = resized.x_train[np.array([0, 3])]
  assert img.shape == (2, 32, 32, 3)
  # Square 64 -> 32 is a plain bilinear resize of the native image.
  expected = np.asarray(Image.fromarray(tiny.x_train[0]).resize((32, 32), Image.BILINEAR))
  np.testing.assert_array_equal(img[0], expected)


def test_resize_shorter_side_then_center_crop():
  # 40 wide x 20 tall: shorter side 20 -> 10 gives 20x10, then the middle 10 columns.
  array = np.zeros((20, 40, 3), np.uint8)
  array[:, 15:25] = 255  # A white band exactly in the centre 10 (of 20 after resize) columns.
  out = np.asarray(sources.resize_shorter_and_center_crop(Image.fromarray(array), 10))
  assert out.shape == (10, 10, 3)
  assert out[:, 3:7].min() == 255  # Centre of the crop is the band.
  assert out[:, 0].max() < 128 and out[:, -1].max() < 128  # Edges are outside the band.


def test_mixed_native_sizes_need_image_size(tmp_path):
  for split in ("train", "test"):
    (tmp_path / split / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / split / "a" / "0.png")
    Image.new("RGB", (12, 6), (10, 20, 30)).save(tmp_path / split / "a" / "1.png")
  data = sources.load_dataset("folder", path=str(tmp_path))
  with pytest.raises(ValueError, match="pass image_size"):
    data.x_train[np.array([0, 1])]
  fixed = sources.load_dataset("folder", path=str(tmp_path), image_size=4)
  out = fixed.x_train[np.array([0, 1])]
  assert out.shape == (2, 4, 4, 3)
  np.testing.assert_array_equal(out[..., 0], 10)


# --- list -----------------------------------------------------------------------------------------


def _some_images(tiny, n):
  idx = np.linspace(0, len(tiny.y_train) - 1, n).astype(int)
  return [(tiny.x_train.sources[i], int(tiny.y_train[i])) for i in idx]


def test_list_source(tmp_path, tiny, tiny_imagenet_dir):
  picked = _some_images(tiny, 6)
  root = pathlib.Path(tiny_imagenet_dir)
  # Relative paths (to data_dir) for train, absolute ones for test; labels renumbered 0..2.
  with open(tmp_path / "train.txt", "w") as f:
    for k, (p, _) in enumerate(picked[:4]):
      f.write(f"{os.path.relpath(p, root)} {k % 3}\n")
    f.write("\n")  # Blank lines are skipped.
  with open(tmp_path / "test.txt", "w") as f:
    for k, (p, _) in enumerate(picked[4:]):
      f.write(f"{p} {k + 1}\n")
  data = sources.load_dataset("list", path=str(tmp_path), data_dir=str(root), name="mini")
  assert data.name == "mini" and data.num_classes == 3 and data.class_names == ("0", "1", "2")
  np.testing.assert_array_equal(data.y_train, [0, 1, 2, 0])
  np.testing.assert_array_equal(data.y_test, [1, 2])
  assert data.x_train.shape == (4, 64, 64, 3)
  np.testing.assert_array_equal(data.x_train[np.array([1, 3])],
                                tiny.x_train[np.array([tiny.x_train.sources.index(picked[1][0]),
                                                       tiny.x_train.sources.index(picked[3][0])])])
  np.testing.assert_array_equal(data.x_test[0], np.asarray(Image.open(picked[4][0]).convert("RGB")))
  resized = sources.load_dataset("list", path=str(tmp_path), data_dir=str(root), image_size=48)
  assert resized.x_test[np.array([0, 1])].shape == (2, 48, 48, 3)
  # Without data_dir the relative paths resolve against path, where they do not exist.
  with pytest.raises(FileNotFoundError, match="pass data_dir"):
    sources.load_dataset("list", path=str(tmp_path))


def test_list_malformed_line(tmp_path, tiny):
  (p0, _), (p1, _) = _some_images(tiny, 2)
  (tmp_path / "train.txt").write_text(f"{p0} 0\n{p1} zero\n")
  (tmp_path / "test.txt").write_text(f"{p0} 0\n")
  with pytest.raises(ValueError, match=r"train.txt, line 2: expected '<image path> "):
    sources.load_dataset("list", path=str(tmp_path))
  (tmp_path / "train.txt").write_text(f"{p0} 0\n")
  (tmp_path / "test.txt").write_text(f"{p0}0\n{p1}\n")
  with pytest.raises(ValueError, match=r"test.txt, line 1"):
    sources.load_dataset("list", path=str(tmp_path))


# --- npz files that are not readable archives -----------------------------------------------------


def _small_npz(path, compressed=False):
  x = np.zeros((4, 4, 4, 3), np.uint8)
  y = np.arange(4, dtype=np.int64)
  (np.savez_compressed if compressed else np.savez)(path, x_train=x, y_train=y, x_test=x, y_test=y)
  return path


def _assert_one_line_naming(err, path):
  message = str(err.value)
  assert "\n" not in message and str(path) in message, message
  assert "allow_pickle" not in message, message
  assert "compressed numpy .npz" in message and "x_test, y_test" in message, message


@pytest.mark.parametrize("compressed", [False, True])
def test_a_truncated_npz_is_one_error_naming_the_file(tmp_path, compressed):
  whole = _small_npz(tmp_path / "whole.npz", compressed).read_bytes()
  cut = tmp_path / "cut.npz"
  cut.write_bytes(whole[:len(whole) // 2])
  with pytest.raises(ValueError) as err:
    sources.load_dataset("npz", path=str(cut))
  _assert_one_line_naming(err, cut)


def test_a_non_zip_npz_is_one_error_that_never_suggests_allow_pickle(tmp_path):
  """np.load takes bytes that are no zip for a pickle and suggests allow_pickle=True: unsafe."""
  noise = tmp_path / "noise.npz"
  noise.write_bytes(np.random.default_rng(0).bytes(4096))
  npy = tmp_path / "array.npz"  # a lone .npy array under an .npz name
  with open(npy, "wb") as f:
    np.save(f, np.zeros(3))
  for path in (noise, npy):
    with pytest.raises(ValueError) as err:
      sources.load_dataset("npz", path=str(path))
    _assert_one_line_naming(err, path)


def test_npz_members_that_are_damaged_pickled_or_not_arrays_are_one_error(tmp_path):
  damaged = tmp_path / "damaged.npz"
  data = bytearray(_small_npz(tmp_path / "ok.npz").read_bytes())
  pixels = data.index(b"\x93NUMPY") + 128  # x_train's zeros, after its .npy header
  data[pixels:pixels + 16] = b"\xff" * 16  # no longer match the member's CRC
  damaged.write_bytes(bytes(data))
  pickled = tmp_path / "pickled.npz"
  x = np.zeros((4, 4, 4, 3), np.uint8)
  np.savez(pickled, x_train=x, y_train=np.arange(4), x_test=x, y_test=np.arange(4),
           fine_label_names=np.array(["a", 1, None, 2.0], dtype=object))
  raw = tmp_path / "raw.npz"
  with zipfile.ZipFile(raw, "w") as archive:
    archive.writestr("x_train.npy", b"pixels without an .npy header")
  for path, says in ((damaged, "damaged"), (pickled, "pickled Python objects"),
                     (raw, "x_train is not a numpy array")):
    with pytest.raises(ValueError, match=says) as err:
      sources.load_dataset("npz", path=str(path))
    _assert_one_line_naming(err, path)
