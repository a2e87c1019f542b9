"""Per-example random augmentation in JAX (docs/method.md §6.7), jittable and vmap-friendly.

Every function takes a whole uint8 batch ``[B, H, W, 3]`` and returns normalised floats, so the
augmentation runs on device inside the jitted training step instead of in a host data loader.
Shapes are static; the randomness (crop box, flip) is data, drawn per example from its own key.

Crop + resize is written as two dense interpolation matrices per example,
``out[o, p] = Σ_{h, w} Wy[o, h] · img[h, w] · Wx[p, w]``, where ``Wy``/``Wx`` hold PIL's bilinear
("triangle") filter restricted to the crop box and renormalised. This is exactly torchvision's
``resized_crop`` on a PIL image (crop first, then ``Image.resize(BILINEAR)`` which antialiases when
shrinking, support = max(1, in/out)); the only difference is that PIL rounds its output to uint8
(≤ 0.5/255 per pixel), which we skip. A horizontal flip is the reversal of the rows of ``Wx``.
"""

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

CIFAR_MEAN = (0.5071, 0.4866, 0.4409)
CIFAR_STD = (0.2009, 0.1984, 0.2023)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision RandomResizedCrop defaults.
DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_ATTEMPTS = 10

TrainFn = Callable[[jax.Array, jax.Array], jax.Array]
TestFn = Callable[[jax.Array], jax.Array]


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float],
              dtype=jnp.float32) -> jax.Array:
  """``(x / 255 − mean) / std`` per channel (torchvision ``ToTensor`` + ``Normalize``)."""
  x = images.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x.astype(dtype)


def _check_images(images: jax.Array, name: str) -> None:
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{name}: expected images [B, H, W, 3], got shape {images.shape}; "
                     "add a batch axis / convert to RGB first")


def _fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
  """torchvision's fallback: the centre crop with the aspect ratio clamped into ``ratio``."""
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _one_box(key: jax.Array, height: int, width: int, scale: tuple[float, float],
             ratio: tuple[float, float]) -> jax.Array:
  """One ``(top, left, h, w)`` box: the first of 10 candidates that fits, else the fallback."""
  u_area, u_ratio, u_top, u_left = jax.random.uniform(key, (4, _ATTEMPTS))
  area = float(height * width)
  target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_lo + (log_hi - log_lo) * u_ratio)
  # Python's round() and jnp.round() both round half to even.
  w = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
  h = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  # torch.randint(0, n - s + 1): uniform integer in [0, n - s].
  top = jnp.floor(u_top * (height - h + 1)).astype(jnp.int32)
  left = jnp.floor(u_left * (width - w + 1)).astype(jnp.int32)
  top = jnp.minimum(top, height - h)
  left = jnp.minimum(left, width - w)
  first = jnp.argmax(fits)
  candidate = jnp.stack([top[first], left[first], h[first], w[first]])
  fallback = jnp.asarray(_fallback_box(height, width, ratio), jnp.int32)
  return jnp.where(jnp.any(fits), candidate, fallback)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def random_resized_crop_boxes(key: jax.Array, batch: int, height: int, width: int,
                              scale: tuple[float, float] = DEFAULT_SCALE,
                              ratio: tuple[float, float] = DEFAULT_RATIO) -> jax.Array:
  """Crop boxes with torchvision ``RandomResizedCrop.get_params`` semantics, one per example.

  For each example (own key, split from ``key``) 10 candidates are drawn at once: area
  ``s · H · W`` with ``s ~ U(scale)``, aspect ``r = exp(U(log ratio))``, ``w = round(√(area·r))``,
  ``h = round(√(area/r))``, top-left uniform over the positions where the box fits. The first
  candidate with ``0 < w ≤ W`` and ``0 < h ≤ H`` wins (the loop of torchvision, vectorised);
  if none fits, the centre crop with the aspect ratio clamped into ``ratio`` is used.

  Args:
    key: PRNG key.
    batch: number of boxes (static).
    height, width: image size the boxes live in (static).
    scale: range of the crop area as a fraction of the image area.
    ratio: range of the aspect ratio w / h.

  Returns:
    int32 ``[batch, 4]`` boxes ``(top, left, h, w)``, always inside the image.
  """
  if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
    raise ValueError(f"scale={scale}, ratio={ratio}: both must be (low, high) with 0 < low <= high")
  keys = jax.random.split(key, batch)
  return jax.vmap(lambda k: _one_box(k, height, width, tuple(scale), tuple(ratio)))(keys)


def _interpolation_matrix(start: jax.Array, length: jax.Array, in_size: int,
                          out_size: int) -> jax.Array:
  """``[out_size, in_size]`` PIL-bilinear weights resizing ``[start, start + length)`` to out_size.

  Output pixel o samples the input at centre ``c = start + (o + ½) · length / out_size``; input
  pixel j gets weight ``tri((j + ½ − c) / s)`` with ``tri(x) = max(0, 1 − |x|)`` and
  ``s = max(1, length / out_size)`` (antialiasing when shrinking); pixels outside the crop get 0
  and each row is renormalised to sum 1, as PIL does on the cropped image.
  """
  start = start.astype(jnp.float32)
  length = length.astype(jnp.float32)
  step = length / out_size
  support = jnp.maximum(step, 1.0)
  centre = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * step
  j = jnp.arange(in_size, dtype=jnp.float32)
  weights = jnp.maximum(0.0, 1.0 - jnp.abs((j[None, :] + 0.5 - centre[:, None]) / support))
  inside = (j >= start) & (j < start + length)
  weights = jnp.where(inside[None, :], weights, 0.0)
  return weights / jnp.maximum(jnp.sum(weights, axis=1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnums=2)
def crop_and_resize(images: jax.Array, boxes: jax.Array, size: int,
                    flip: jax.Array | None = None) -> jax.Array:
  """Crops ``boxes`` (``[B, 4]`` top, left, h, w) out of ``images`` and resizes them to ``size``.

  Bilinear with PIL's antialiasing (see the module docstring); ``flip`` (``[B]`` bool) mirrors
  the result horizontally. Returns float32 ``[B, size, size, C]`` in the input's value range.
  """
  _, height, width, _ = images.shape

  def one(image, box, flip_one):
    wy = _interpolation_matrix(box[0], box[2], height, size)
    wx = _interpolation_matrix(box[1], box[3], width, size)
    wx = jnp.where(flip_one, wx[::-1], wx)
    x = image.astype(jnp.float32)
    x = jnp.einsum("oh,hwc->owc", wy, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("pw,owc->opc", wx, x, precision=jax.lax.Precision.HIGHEST)

  if flip is None:
    flip = jnp.zeros((images.shape[0],), bool)
  return jax.vmap(one)(images, boxes, flip)


def _random_flips(key: jax.Array, batch: int) -> jax.Array:
  return jax.random.bernoulli(key, 0.5, (batch,))


@functools.partial(jax.jit, static_argnames=("padding", "scale", "ratio", "dtype"))
def cifar_train(key: jax.Array, images_u8: jax.Array, padding: int = 4,
                scale: tuple[float, float] = DEFAULT_SCALE,
                ratio: tuple[float, float] = DEFAULT_RATIO, dtype=jnp.float32) -> jax.Array:
  """CIFAR training transform: zero-pad 4 → random-resized crop back to H×W → flip → normalise.

  The crop box is drawn on the padded ``(H+8)×(W+8)`` image (torchvision ``Pad(4)`` fills zeros,
  i.e. black pixels, before normalisation); output size equals the input size (32 on CIFAR).

  Args:
    key: PRNG key; every example gets its own box and flip.
    images_u8: uint8 ``[B, H, W, 3]``.
    padding: pixels of zero padding on each side.
    scale, ratio: ``RandomResizedCrop`` ranges (defaults 0.08–1 and 3/4–4/3).
    dtype: output dtype.

  Returns:
    ``[B, H, W, 3]`` normalised with the CIFAR-100 mean/std.
  """
  _check_images(images_u8, "cifar_train")
  batch, height, width, _ = images_u8.shape
  if height != width:
    raise ValueError(f"cifar_train: expected square images, got {height}x{width}")
  padded = jnp.pad(images_u8, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  k_box, k_flip = jax.random.split(key)
  boxes = random_resized_crop_boxes(k_box, batch, height + 2 * padding, width + 2 * padding,
                                    scale, ratio)
  x = crop_and_resize(padded, boxes, height, _random_flips(k_flip, batch))
  return _normalize_float(x, CIFAR_MEAN, CIFAR_STD, dtype)


def _normalize_float(x: jax.Array, mean, std, dtype) -> jax.Array:
  """Normalises float pixels in [0, 255] (the output of ``crop_and_resize``)."""
  x = x / 255.0
  return ((x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)).astype(dtype)


@functools.partial(jax.jit, static_argnames=("dtype",))
def cifar_test(images_u8: jax.Array, dtype=jnp.float32) -> jax.Array:
  """CIFAR test transform: pad 4 → centre crop 32 is the identity, so only normalise."""
  _check_images(images_u8, "cifar_test")
  return normalize(images_u8, CIFAR_MEAN, CIFAR_STD, dtype)


@functools.partial(jax.jit, static_argnames=("size", "scale", "ratio", "dtype"))
def imagenet_train(key: jax.Array, images_u8: jax.Array, size: int = 224,
                   scale: tuple[float, float] = DEFAULT_SCALE,
                   ratio: tuple[float, float] = DEFAULT_RATIO, dtype=jnp.float32) -> jax.Array:
  """ImageNet-style training transform: random-resized crop to ``size`` → flip → normalise.

  The stored images are already resized (shorter side S) and centre-cropped to S×S by the data
  layer, so the crop box is drawn on the S×S image.

  Returns:
    ``[B, size, size, 3]`` normalised with the ImageNet mean/std.
  """
  _check_images(images_u8, "imagenet_train")
  batch, height, width, _ = images_u8.shape
  k_box, k_flip = jax.random.split(key)
  boxes = random_resized_crop_boxes(k_box, batch, height, width, scale, ratio)
  x = crop_and_resize(images_u8, boxes, size, _random_flips(k_flip, batch))
  return _normalize_float(x, IMAGENET_MEAN, IMAGENET_STD, dtype)


@functools.partial(jax.jit, static_argnames=("size", "dtype"))
def imagenet_test(images_u8: jax.Array, size: int = 224, dtype=jnp.float32) -> jax.Array:
  """ImageNet-style test transform: centre crop ``size`` → normalise.

  If the stored side S ≥ ``size`` this is torchvision's ``CenterCrop(size)`` (top-left offset
  ``round((S − size) / 2)``, pixels copied exactly); if S < ``size`` the image is resized
  (bilinear) up to ``size`` instead, since there is nothing to crop.
  """
  _check_images(images_u8, "imagenet_test")
  batch, height, width, _ = images_u8.shape
  if height >= size and width >= size:
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    x = images_u8[:, top:top + size, left:left + size]
    return normalize(x, IMAGENET_MEAN, IMAGENET_STD, dtype)
  boxes = jnp.broadcast_to(jnp.asarray([0, 0, height, width], jnp.int32), (batch, 4))
  x = crop_and_resize(images_u8, boxes, size)
  return _normalize_float(x, IMAGENET_MEAN, IMAGENET_STD, dtype)


RECIPES = ("cifar", "imagenet")


def get_augmentation(recipe: str, image_size: int, dtype=jnp.float32) -> tuple[TrainFn, TestFn]:
  """``(train_fn(key, images_u8), test_fn(images_u8))`` for a recipe name.

  Args:
    recipe: ``'cifar'`` (pad 4 + random-resized crop back to the stored size; CIFAR mean/std) or
      ``'imagenet'`` (random-resized crop / centre crop to ``image_size``; ImageNet mean/std).
    image_size: the stored image side; for ``'imagenet'`` also the crop size the model sees.
    dtype: output dtype.

  Raises:
    ValueError: unknown recipe, or (at trace time) CIFAR images whose side is not ``image_size``.
  """
  if recipe == "cifar":
    def check(images):
      if images.shape[1:3] != (image_size, image_size):
        raise ValueError(f"cifar augmentation built for image_size={image_size} got images of "
                         f"shape {images.shape}; set data.image_size to the stored image side")

    def train_fn(key, images):
      check(images)
      return cifar_train(key, images, dtype=dtype)

    def test_fn(images):
      check(images)
      return cifar_test(images, dtype=dtype)

    return train_fn, test_fn
  if recipe == "imagenet":
    return (lambda key, images: imagenet_train(key, images, image_size, dtype=dtype),
            lambda images: imagenet_test(images, image_size, dtype=dtype))
  raise ValueError(f"unknown augmentation recipe {recipe!r}; valid names: {', '.join(RECIPES)}")
