"""Dataset sources: one in-memory (or lazily decoded) view of a labelled image dataset.

Every source returns the same :class:`Dataset`: uint8 ``[N, H, W, 3]`` images and int32 labels in
the dataset's *original* label space (``0..K-1``), with the official train/test split. Class order,
long-tail selection, task splits and validation hold-out are the protocol's business
(:mod:`gr_jax.data.protocol`), so a source never reorders or subsamples anything.

Sources (``load_dataset(source, ...)``):

* ``npz``: a NumPy archive with ``x_train, y_train, x_test, y_test`` (+ optional
  ``fine_label_names`` / ``label_names``), e.g. the shared pixel-exact ``cifar100.npz``.
* ``folder``: an ImageFolder tree ``path/{train,test}/<class>/<image>``; classes are the sorted
  sub-folder names of ``train/`` (the same convention as ``tfds.folder_dataset.ImageFolder``).
* ``list``: the reference implementation's ``train.txt`` / ``test.txt`` (``<image path> <label>``
  per line).
* ``tfds``: any TensorFlow Datasets image-classification dataset with ``image`` / ``label``
  features (``cifar100``, ``food101``, ...). TensorFlow is imported only inside this branch, so the
  other sources work on machines without it (the GPU machines have none).

JPEG-backed sources (``folder``, ``list`` and the variable-size ``tfds`` datasets) return a
:class:`LazyImages` container instead of an array: ``x[idx]`` decodes only the requested images (in
a thread pool), so selecting a long-tailed subset never decodes the discarded images.

Store-time transform: when ``image_size`` is given, each decoded image is resized so that its
*shorter* side equals ``image_size`` (bilinear, aspect ratio kept, like ``torchvision``'s
``Resize(int)``) and then centre-cropped to ``image_size × image_size`` (torchvision's
``CenterCrop`` rounding). This only gives every image one shape so that batches can be stacked;
the training augmentation (random-resized crop etc.) runs afterwards on these stored images. With
``image_size=None`` images keep their native size, which must then be the same for all images.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import socket
import threading
import urllib.parse
import urllib.request
from typing import Any, Sequence, Union
import zipfile
import zlib

from absl import logging
import numpy as np
from PIL import Image

SOURCES = ("tfds", "npz", "folder", "list")

# Image file name endings the ``folder`` source picks up (case-insensitive); anything else in a
# class folder (README, .DS_Store, ...) is ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Datasets this project runs, for convenience: tfds name -> what the protocol expects of it. Any
# other tfds image-classification dataset works too; this only documents the known ones.
KNOWN_TFDS_DATASETS = {
    "cifar100": "CIFAR-100, 32x32, 100 classes, 500 train / 100 test per class (split: test)",
    "cifar10": "CIFAR-10, 32x32, 10 classes (split: test)",
    "food101": "Food-101, variable-size JPEGs, 101 classes, 750 train / 250 validation per class "
               "(split: validation used as test)",
    "imagenet2012": "ImageNet-1k, variable-size JPEGs, 1000 classes (split: validation used as "
                    "test; needs a manual download)",
}

_NPZ_REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
_NPZ_NAME_KEYS = ("fine_label_names", "label_names", "class_names")
_NPZ_LAYOUT = ("an uncompressed or compressed numpy .npz (np.savez / np.savez_compressed) with "
               "arrays x_train uint8 [N,H,W,3], y_train [N], x_test, y_test and optionally "
               "fine_label_names")


ArrayLike = Union[np.ndarray, "LazyImages"]


class MissingExtraError(ImportError):
  """A source needs packages of an optional extra that is not installed; the message says which."""


# --------------------------------------------------------------------------------------------------
# Decoding.


def resize_shorter_and_center_crop(image: Image.Image, size: int) -> Image.Image:
  """The store-time transform: shorter side -> ``size`` (bilinear), then centre crop to a square.

  Mirrors ``torchvision.transforms.Resize(size)`` followed by ``CenterCrop(size)`` so that images
  stored by gr_jax look like what the reference's ImageNet-style pipeline sees.

  Args:
    image: an RGB PIL image.
    size: the output side length.

  Returns:
    A ``size × size`` PIL image.
  """
  width, height = image.size
  if (width, height) != (size, size):
    if width <= height:
      new_w, new_h = size, int(size * height / width)
    else:
      new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != (width, height):
      image = image.resize((new_w, new_h), Image.BILINEAR)
    width, height = image.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
  return image


def decode_image(source: str | bytes, image_size: int | None = None) -> np.ndarray:
  """Decodes one image file (path or encoded bytes) to uint8 ``[H, W, 3]`` RGB with PIL.

  Args:
    source: a file path, or the encoded bytes (e.g. a JPEG read by tfds without decoding).
    image_size: if given, apply :func:`resize_shorter_and_center_crop`.

  Returns:
    The decoded image.
  """
  fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
  with Image.open(fp) as image:
    image = image.convert("RGB")
    if image_size is not None:
      image = resize_shorter_and_center_crop(image, image_size)
    return np.asarray(image, dtype=np.uint8)


def _peek_size(source: str | bytes) -> tuple[int, int]:
  """(height, width) of an image from its header only (no pixel decode)."""
  fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
  with Image.open(fp) as image:
    width, height = image.size
  return height, width


_EXECUTOR_LOCK = threading.Lock()
_EXECUTOR: concurrent.futures.ThreadPoolExecutor | None = None


def _executor() -> concurrent.futures.ThreadPoolExecutor:
  """One process-wide decode pool (Pillow releases the GIL while decoding, so threads scale)."""
  global _EXECUTOR
  with _EXECUTOR_LOCK:
    if _EXECUTOR is None:
      workers = min(32, (os.cpu_count() or 1) + 4)
      _EXECUTOR = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="gr_jax_decode")
    return _EXECUTOR


class LazyImages:
  """Images kept encoded (file paths or bytes) and decoded on indexing.

  ``x[i]`` gives one uint8 ``[H, W, 3]`` image; ``x[index_array]``, ``x[slice]`` or ``x[bool_mask]``
  give a uint8 ``[n, H, W, 3]`` batch, decoded in a thread pool. ``np.asarray(x)`` decodes
  everything (only sensible for small sets); :meth:`subset` selects without decoding.

  Decoding is deterministic (no augmentation), so repeated indexing returns identical pixels.
  """

  def __init__(self, sources: Sequence[str | bytes], image_size: int | None = None,
               image_hw: tuple[int, int] | None = None):
    """Creates the container.

    Args:
      sources: one file path or encoded byte string per image.
      image_size: store-time resize/crop side (see module docstring), or None for native size.
      image_hw: the common native (height, width) when ``image_size`` is None; read from the first
        image's header when not given.

    Raises:
      ValueError: if ``sources`` is empty.
    """
    self._sources = tuple(sources)
    if not self._sources:
      raise ValueError("LazyImages needs at least one image")
    self._image_size = image_size
    if image_size is not None:
      self._hw = (int(image_size), int(image_size))
    elif image_hw is not None:
      self._hw = (int(image_hw[0]), int(image_hw[1]))
    else:
      self._hw = _peek_size(self._sources[0])

  # --- array protocol -----------------------------------------------------------------------------
  @property
  def shape(self) -> tuple[int, int, int, int]:
    return (len(self._sources), self._hw[0], self._hw[1], 3)

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(np.uint8)

  @property
  def ndim(self) -> int:
    return 4

  @property
  def image_size(self) -> int | None:
    return self._image_size

  @property
  def sources(self) -> tuple[str | bytes, ...]:
    """The file paths (``folder``/``list``) or encoded bytes (``tfds``) behind each image."""
    return self._sources

  def __len__(self) -> int:
    return len(self._sources)

  def __repr__(self) -> str:
    return f"LazyImages(shape={self.shape}, image_size={self._image_size})"

  def _decode_one(self, i: int) -> np.ndarray:
    source = self._sources[i]
    try:
      image = decode_image(source, self._image_size)
    except (OSError, ValueError) as e:
      where = source if isinstance(source, str) else f"image #{i} (encoded bytes)"
      raise ValueError(f"cannot decode {where}: {e}") from e
    if image.shape[:2] != self._hw:
      where = source if isinstance(source, str) else f"image #{i}"
      raise ValueError(
          f"{where} is {image.shape[1]}x{image.shape[0]} but the dataset's images are "
          f"{self._hw[1]}x{self._hw[0]}: images of different sizes need a common store size; "
          f"pass image_size=... to load_dataset")
    return image

  def _indices(self, index: Any) -> np.ndarray:
    n = len(self._sources)
    if isinstance(index, slice):
      return np.arange(n)[index]
    idx = np.asarray(index)
    if idx.dtype == np.bool_:
      if idx.shape != (n,):
        raise IndexError(f"boolean mask of shape {idx.shape} for {n} images")
      return np.flatnonzero(idx)
    if not np.issubdtype(idx.dtype, np.integer):
      if idx.size == 0:
        return np.zeros((0,), np.int64)
      raise IndexError(f"LazyImages index must be integers, a slice or a boolean mask, "
                       f"got dtype {idx.dtype}")
    idx = idx.astype(np.int64).reshape(-1)
    if idx.size and (idx.min() < -n or idx.max() >= n):
      raise IndexError(f"image index out of range for {n} images "
                       f"(min {idx.min()}, max {idx.max()})")
    return np.where(idx < 0, idx + n, idx)

  def __getitem__(self, index: Any) -> np.ndarray:
    if isinstance(index, (int, np.integer)):
      i = int(index)
      if not -len(self) <= i < len(self):
        raise IndexError(f"image index {i} out of range for {len(self)} images")
      return self._decode_one(i % len(self))
    idx = self._indices(index)
    out = np.empty((idx.size, self._hw[0], self._hw[1], 3), np.uint8)
    if idx.size <= 4:
      for k, i in enumerate(idx):
        out[k] = self._decode_one(int(i))
    else:
      def fill(k_i):
        out[k_i[0]] = self._decode_one(int(k_i[1]))
      list(_executor().map(fill, enumerate(idx)))
    return out

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    del copy  # Always a fresh array.
    out = self[np.arange(len(self))]
    return out if dtype is None else out.astype(dtype)

  def subset(self, index: Any) -> "LazyImages":
    """The images at ``index`` as a new lazy container, without decoding anything."""
    idx = self._indices(index)
    return LazyImages([self._sources[i] for i in idx], self._image_size,
                      image_hw=self._hw)


# --------------------------------------------------------------------------------------------------
# The dataset.


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A labelled image dataset with its official train/test split, in original label order.

  Attributes:
    name: a short name (``cifar100``, the folder name, ...); the protocol uses it to pick a fixed
      class order where one is specified (CIFAR-100).
    x_train: uint8 ``[N, H, W, 3]``: a NumPy array or a :class:`LazyImages` (decoded on indexing).
    y_train: int32 ``[N]`` original labels ``0..K-1``.
    x_test: like ``x_train``.
    y_test: int32 ``[N_test]``.
    class_names: the K class names, index = original label.
  """
  name: str
  x_train: ArrayLike
  y_train: np.ndarray
  x_test: ArrayLike
  y_test: np.ndarray
  class_names: tuple[str, ...]

  def __post_init__(self):
    # Labels become read-only int32 so nothing downstream can mutate the shared dataset.
    for split in ("train", "test"):
      x = getattr(self, f"x_{split}")
      y = np.asarray(getattr(self, f"y_{split}"))
      if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
        raise ValueError(f"dataset '{self.name}': y_{split} must be a 1-D integer array, "
                         f"got shape {y.shape} dtype {y.dtype}")
      if len(x) != y.shape[0]:
        raise ValueError(f"dataset '{self.name}': x_{split} has {len(x)} images but y_{split} has "
                         f"{y.shape[0]} labels")
      if y.size and (y.min() < 0 or y.max() >= len(self.class_names)):
        raise ValueError(
            f"dataset '{self.name}': y_{split} labels span [{y.min()}, {y.max()}] but there are "
            f"{len(self.class_names)} class names; labels must be 0..{len(self.class_names) - 1}")
      y = y.astype(np.int32)
      y.flags.writeable = False
      object.__setattr__(self, f"y_{split}", y)
      if isinstance(x, np.ndarray):
        x.flags.writeable = False
    object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, 3) of the stored images."""
    return tuple(int(d) for d in self.x_train.shape[1:])


# --------------------------------------------------------------------------------------------------
# Loaders.


def dataset_digest(dataset: Dataset, images_per_split: int = 16) -> str:
  """A short content hash of ``dataset``, the same wherever its files live.

  It covers the class names, every label and shape, and ``images_per_split`` images spread evenly
  over each split, so it reads only a few images of a lazily decoded dataset. Checkpoints key on it
  (with the config) so that a run resumes after its data moved, and not on other data.
  """
  h = hashlib.sha256(json.dumps(list(dataset.class_names)).encode())
  for x, y in ((dataset.x_train, dataset.y_train), (dataset.x_test, dataset.y_test)):
    h.update(json.dumps(list(x.shape)).encode())
    h.update(np.ascontiguousarray(y, np.int32).tobytes())
    if len(y):
      idx = np.unique(np.linspace(0, len(y) - 1, images_per_split).astype(np.int64))
      h.update(np.ascontiguousarray(np.asarray(x[idx]), np.uint8).tobytes())
  return h.hexdigest()[:16]


def load_dataset(source: str, *, name: str | None = None, path: str | None = None,
                 data_dir: str | None = None, image_size: int | None = None,
                 download: bool = True) -> Dataset:
  """Loads a dataset from one of the supported sources (see the module docstring).

  Args:
    source: one of ``tfds``, ``npz``, ``folder``, ``list``.
    name: dataset name; required for ``tfds`` (the tfds builder name), otherwise it defaults to the
      file/folder name and only labels the dataset (``cifar100`` selects CIFAR-100's fixed class
      order in the protocol).
    path: the ``.npz`` file, the ImageFolder root, or the folder holding ``train.txt``/``test.txt``.
    data_dir: ``tfds``: the TFDS data directory; ``list``: the root for relative image paths
      (default: ``path``).
    image_size: store-time shorter-side resize + centre crop (folder/list/tfds). None keeps the
      native size.
    download: ``tfds`` only: download and prepare the dataset if it is not in ``data_dir`` yet.

  Returns:
    The :class:`Dataset`.

  Raises:
    ValueError: unknown source or name, malformed files.
    FileNotFoundError: a path that does not exist (the message names it and the expected layout).
  """
  if image_size is not None and (not isinstance(image_size, (int, np.integer)) or image_size < 1):
    raise ValueError(f"image_size must be a positive integer or None, got {image_size!r}")
  if source == "npz":
    return _load_npz(_require_path(path, source), name=name, image_size=image_size)
  if source == "folder":
    return _load_folder(_require_path(path, source), name=name, image_size=image_size)
  if source == "list":
    return _load_list(_require_path(path, source), name=name, data_dir=data_dir,
                      image_size=image_size)
  if source == "tfds":
    if not name:
      raise ValueError("data.source 'tfds' needs a dataset name (e.g. name='cifar100'); known: "
                       f"{', '.join(sorted(KNOWN_TFDS_DATASETS))}")
    return _load_tfds(name, data_dir=data_dir, image_size=image_size, download=download)
  raise ValueError(f"unknown data.source {source!r}: expected one of {', '.join(SOURCES)}")


def _require_path(path: str | os.PathLike | None, source: str) -> pathlib.Path:
  if path is None:
    layouts = {
        "npz": "a .npz file with x_train, y_train, x_test, y_test",
        "folder": "a folder with train/<class>/<image> and test/<class>/<image>",
        "list": "a folder with train.txt and test.txt ('<image path> <label>' per line)",
    }
    raise ValueError(f"data.source {source!r} needs path=...: {layouts[source]}")
  return pathlib.Path(path).expanduser()


def _npz_names(arrays: dict[str, np.ndarray], num_classes: int) -> tuple[str, ...]:
  for key in _NPZ_NAME_KEYS:
    if key in arrays:
      names = tuple(str(n) for n in arrays[key])
      if len(names) != num_classes:
        raise ValueError(f"npz key {key!r} has {len(names)} names for {num_classes} classes")
      return names
  return tuple(str(i) for i in range(num_classes))


def _name_note(name: str | None, default: str) -> str:
  """``; dataset name 'food101'`` for a log line, when the caller named a file or folder source
  otherwise than its file name: the line then says what was read and what it is only called."""
  return f"; dataset name {name!r}" if name and name != default else ""


def _read_npz(path: pathlib.Path) -> tuple[list[str], dict[str, np.ndarray]]:
  """The archive's array names and the arrays :func:`_load_npz` uses, or one ValueError naming the
  file when it is not a readable npz. ``np.load`` alone takes any non-zip bytes for a pickle (and
  advises the unsafe ``allow_pickle=True``) and lets zipfile's traceback out for a truncated or
  damaged archive."""
  with open(path, "rb") as f:  # a file that cannot be opened fails here with its own OSError
    if not zipfile.is_zipfile(f):
      raise ValueError(f"npz file {path} is not a zip archive (truncated, or another format); "
                       f"expected {_NPZ_LAYOUT}")
  try:
    with np.load(path, allow_pickle=False) as archive:
      files = sorted(archive.files)
      arrays = {k: archive[k] for k in files if k in _NPZ_REQUIRED_KEYS + _NPZ_NAME_KEYS}
  except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as err:
    reason = ("it holds pickled Python objects, which are never loaded (unsafe); store plain "
              "arrays, e.g. np.array(names, dtype=str)" if "allow_pickle" in str(err)
              else f"damaged: {err}")
    raise ValueError(f"npz file {path} cannot be read ({reason}); expected {_NPZ_LAYOUT}") from None
  for key, value in arrays.items():
    if not isinstance(value, np.ndarray):  # np.load hands a member without the .npy header as bytes
      raise ValueError(f"npz file {path}: {key} is not a numpy array; expected {_NPZ_LAYOUT}")
  return files, arrays


def _load_npz(path: pathlib.Path, *, name: str | None, image_size: int | None) -> Dataset:
  """Reads the whole archive into memory (it is read once per process; ~170 MB for CIFAR-100)."""
  if not path.is_file():
    raise FileNotFoundError(f"npz file not found: {path} (expected {_NPZ_LAYOUT})")
  files, arrays = _read_npz(path)
  missing = [k for k in _NPZ_REQUIRED_KEYS if k not in arrays]
  if missing:
    raise ValueError(f"npz file {path} lacks arrays {missing} (has {files}); "
                     f"expected {list(_NPZ_REQUIRED_KEYS)}")
  for split in ("train", "test"):
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
      raise ValueError(f"npz file {path}: x_{split} must be uint8 [N, H, W, 3], got "
                       f"{x.dtype} {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
      raise ValueError(f"npz file {path}: y_{split} must be [N] with N = {x.shape[0]} "
                       f"(len of x_{split}), got shape {y.shape}")
  if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
    raise ValueError(f"npz file {path}: x_train images are {arrays['x_train'].shape[1:]} but "
                     f"x_test images are {arrays['x_test'].shape[1:]}")
  num_classes = int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
  class_names = _npz_names(arrays, num_classes)
  height, width = arrays["x_train"].shape[1:3]
  if image_size is not None and (height, width) != (image_size, image_size):
    raise ValueError(f"npz file {path} stores {height}x{width} images; image_size={image_size} "
                     "is not applied to npz arrays (resize them when building the file, or pass "
                     "image_size=None)")
  logging.info("npz %s: %d train / %d test images of %s, %d classes%s", path,
               len(arrays["y_train"]), len(arrays["y_test"]), arrays["x_train"].shape[1:],
               num_classes, _name_note(name, path.stem))
  name = name or path.stem
  return Dataset(name=name, x_train=arrays["x_train"], y_train=arrays["y_train"],
                 x_test=arrays["x_test"], y_test=arrays["y_test"], class_names=class_names)


def _lazy(sources: Sequence[str], image_size: int | None) -> LazyImages:
  return LazyImages(sources, image_size)


def _check_same_native_size(x_train: LazyImages, x_test: LazyImages, where: pathlib.Path) -> None:
  if x_train.image_size is None and x_train.shape[1:] != x_test.shape[1:]:
    raise ValueError(f"{where}: train images are {x_train.shape[2]}x{x_train.shape[1]} but test "
                     f"images are {x_test.shape[2]}x{x_test.shape[1]}; pass image_size=... to "
                     "store them at one size")


_FOLDER_LAYOUT = "path/train/<class>/<image> and path/test/<class>/<image>"


def _scan_split(split_dir: pathlib.Path, classes: Sequence[str]) -> tuple[list[str], np.ndarray]:
  paths, labels = [], []
  for label, cls in enumerate(classes):
    files = sorted(f for f in os.listdir(split_dir / cls)
                   if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    if not files:
      raise ValueError(f"class folder {split_dir / cls} holds no images "
                       f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
    paths.extend(str(split_dir / cls / f) for f in files)
    labels.extend([label] * len(files))
  return paths, np.asarray(labels, np.int32)


def _load_folder(path: pathlib.Path, *, name: str | None, image_size: int | None) -> Dataset:
  """ImageFolder: classes are the sorted sub-folders of ``train/``; files sorted inside a class."""
  if not path.is_dir():
    raise FileNotFoundError(f"image folder not found: {path} (expected {_FOLDER_LAYOUT})")
  class_sets = {}
  for split in ("train", "test"):
    split_dir = path / split
    if not split_dir.is_dir():
      raise FileNotFoundError(f"image folder {path} has no {split}/ sub-folder "
                              f"(expected {_FOLDER_LAYOUT})")
    class_sets[split] = sorted(d.name for d in split_dir.iterdir()
                               if d.is_dir() and not d.name.startswith("."))
  classes = class_sets["train"]
  if not classes:
    raise ValueError(f"{path / 'train'} has no class folders (expected {_FOLDER_LAYOUT})")
  if class_sets["test"] != classes:
    only_train = sorted(set(classes) - set(class_sets["test"]))
    only_test = sorted(set(class_sets["test"]) - set(classes))
    raise ValueError(f"{path}: train/ and test/ must hold the same class folders; only in train: "
                     f"{only_train[:5]}, only in test: {only_test[:5]}")
  train_paths, y_train = _scan_split(path / "train", classes)
  test_paths, y_test = _scan_split(path / "test", classes)
  x_train, x_test = _lazy(train_paths, image_size), _lazy(test_paths, image_size)
  _check_same_native_size(x_train, x_test, path)
  logging.info("folder %s (ImageFolder, %d classes): %d train / %d test images, stored %s%s", path,
               len(classes), len(y_train), len(y_test), x_train.shape[1:],
               _name_note(name, path.name))
  name = name or path.name
  return Dataset(name=name, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                 class_names=tuple(classes))


def _read_list_file(list_file: pathlib.Path, root: pathlib.Path) -> tuple[list[str], np.ndarray]:
  if not list_file.is_file():
    raise FileNotFoundError(f"image list not found: {list_file} (expected train.txt and test.txt "
                            "in path, one '<image path> <integer label>' per line)")
  paths, labels = [], []
  with open(list_file, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      stripped = line.strip()
      if not stripped or stripped.startswith("#"):
        continue
      parts = stripped.rsplit(maxsplit=1)
      label = None
      if len(parts) == 2:
        try:
          label = int(parts[1])
        except ValueError:
          label = None
      if label is None or label < 0:
        raise ValueError(f"{list_file}, line {line_no}: expected '<image path> <non-negative "
                         f"integer label>', got {stripped!r}")
      image = pathlib.Path(parts[0])
      paths.append(str(image if image.is_absolute() else root / image))
      labels.append(label)
  if not paths:
    raise ValueError(f"image list {list_file} has no entries")
  return paths, np.asarray(labels, np.int32)


def _load_list(path: pathlib.Path, *, name: str | None, data_dir: str | None,
               image_size: int | None) -> Dataset:
  """The reference's ``train.txt`` / ``test.txt`` lists; class names are the label numbers."""
  if not path.is_dir():
    raise FileNotFoundError(f"list folder not found: {path} (expected train.txt and test.txt "
                            "there, one '<image path> <integer label>' per line)")
  root = pathlib.Path(data_dir).expanduser() if data_dir else path
  train_paths, y_train = _read_list_file(path / "train.txt", root)
  test_paths, y_test = _read_list_file(path / "test.txt", root)
  for p in (train_paths[0], test_paths[0]):
    if not os.path.exists(p):
      raise FileNotFoundError(f"image {p} listed in {path} does not exist (relative paths are "
                              f"resolved against {root}; pass data_dir=... to change that)")
  num_classes = int(max(y_train.max(), y_test.max())) + 1
  x_train, x_test = _lazy(train_paths, image_size), _lazy(test_paths, image_size)
  _check_same_native_size(x_train, x_test, path)
  logging.info("list %s (train.txt / test.txt, %d classes): %d train / %d test images%s", path,
               num_classes, len(y_train), len(y_test), _name_note(name, path.name))
  name = name or path.name
  return Dataset(name=name, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                 class_names=tuple(str(i) for i in range(num_classes)))


def _resize_array(images: np.ndarray, image_size: int) -> np.ndarray:
  out = np.empty((images.shape[0], image_size, image_size, 3), np.uint8)
  for i, image in enumerate(images):
    out[i] = np.asarray(resize_shorter_and_center_crop(Image.fromarray(image), image_size))
  return out


def _to_rgb(images: np.ndarray) -> np.ndarray:
  if images.ndim == 4 and images.shape[-1] == 1:
    return np.repeat(images, 3, axis=-1)
  return images


def _load_tfds(name: str, *, data_dir: str | None, image_size: int | None,
               download: bool) -> Dataset:
  """TFDS: fixed-size datasets are read whole as arrays; variable-size ones stay encoded (lazy).

  Examples come back in the order of the dataset's ``id`` feature where it has one, not in the
  order tfds shuffled them into on disk: for CIFAR-100 that is the original file order, the order
  the reference's long-tail selection indexes (the same arrays as the npz copy).
  """
  try:
    # TensorFlow first: without it tfds would print a banner before failing.
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    # tfds imports it only when it prepares a dataset, and does not declare it on Python >= 3.9.
    import importlib_resources  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise MissingExtraError(f"data.source 'tfds' needs the [tfds] extra (tensorflow, "
                            f"tensorflow-datasets, importlib-resources; missing: {e.name}): "
                            "pip install -e '.[tfds]' in the checkout; without them use the npz, "
                            "folder or list source") from e
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    # tfds's message lists every dataset it has (hundreds of lines); keep its suggestion only.
    hint = next((l.strip() for l in str(e).splitlines() if l.startswith("Did you mean")), "")
    raise ValueError(f"unknown tfds dataset {name!r}; known here: "
                     f"{', '.join(sorted(KNOWN_TFDS_DATASETS))} (any tfds image-classification "
                     f"dataset name works). {hint}".rstrip()) from None
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise ValueError(f"tfds dataset {name!r} has features {list(features)}; gr_jax needs an "
                     "image-classification dataset with 'image' and 'label' features")
  if not builder.is_prepared():
    _download_and_prepare(builder, name, download)
  test_split = _tfds_test_split(name, list(builder.info.splits))
  class_names = tuple(features["label"].names)
  fixed = all(d is not None for d in features["image"].shape)
  decoders = None if fixed else {"image": tfds.decode.SkipDecoding()}
  keys = ("image", "label", "id") if "id" in features else ("image", "label")

  def read(split):
    columns = {k: [] for k in keys}
    ds = builder.as_dataset(split=split, decoders=decoders).map(lambda ex: {k: ex[k] for k in keys})
    for batch in tfds.as_numpy(ds.batch(1024)):
      for k in keys:
        columns[k].append(batch[k])
    columns = {k: np.concatenate(v) for k, v in columns.items()}
    order = np.argsort(columns["id"], kind="stable") if "id" in columns else slice(None)
    labels = columns["label"][order]
    if not fixed:
      return LazyImages([bytes(b) for b in columns["image"][order]], image_size), labels
    x = _to_rgb(np.asarray(columns["image"][order], np.uint8))
    if image_size is not None and x.shape[1:3] != (image_size, image_size):
      x = _resize_array(x, image_size)
    return x, labels

  x_train, y_train = read("train")
  x_test, y_test = read(test_split)
  if isinstance(x_train, LazyImages) and image_size is None and \
      x_train.shape[1:] != x_test.shape[1:]:
    raise ValueError(f"tfds dataset {name!r} has images of varying size; pass image_size=...")
  logging.info("tfds %s in %s (%s as test): %d train / %d test images, %d classes", name,
               builder.data_dir, test_split, len(y_train), len(y_test), len(class_names))
  return Dataset(name=name, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                 class_names=class_names)


def _tfds_test_split(name: str, splits: Sequence[str]) -> str:
  """The evaluation split: ``test``, or ``validation`` where there is none (Food-101, ImageNet)."""
  if "train" not in splits:
    raise ValueError(f"tfds dataset {name!r} has no 'train' split (has {sorted(splits)})")
  for split in ("test", "validation"):
    if split in splits:
      return split
  raise ValueError(f"tfds dataset {name!r} has neither a 'test' nor a 'validation' split "
                   f"(has {sorted(splits)})")


def _download_and_prepare(builder, name: str, download: bool) -> None:
  """``builder.download_and_prepare()``, but a dataset that cannot be fetched is one error line.

  Offline (no download host resolves and no proxy is set) it fails at once instead of after tfds'
  ten retries (about three minutes).

  Raises:
    FileNotFoundError: not prepared and ``download`` is off, or the download failed; the message
      names the data_dir and the offline ways to get the data.
  """
  root = builder.data_dir_root
  fixes = (f"read a local copy instead (--config.data.source=npz --config.data.path=<file.npz>, "
           f"or source=folder/list), or prepare it where there is network (tfds build {name} "
           f"--data_dir=DIR) and copy DIR to {root}")
  if not download:
    raise FileNotFoundError(f"tfds dataset {name!r} is not prepared in {root} and download is off; "
                            f"set --config.data.download=True, or {fixes}")
  hosts = sorted({urllib.parse.urlsplit(url).hostname for url in builder.url_infos or ()} - {None})
  if hosts and not urllib.request.getproxies() and not any(map(_resolves, hosts)):
    raise FileNotFoundError(f"tfds dataset {name!r} is not prepared in {root} and cannot be "
                            f"downloaded: no network (cannot resolve {', '.join(hosts)}); "
                            f"{fixes}")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder.download_and_prepare()
  except (OSError, tf.errors.OpError, tfds.download.DownloadError) as e:
    cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise FileNotFoundError(f"tfds dataset {name!r} is not prepared in {root} and downloading and "
                            f"preparing it failed ({cause}); {fixes}") from e


def _resolves(host: str) -> bool:
  try:
    socket.getaddrinfo(host, None)
  except (OSError, UnicodeError):
    return False
  return True
