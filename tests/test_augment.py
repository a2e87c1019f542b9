"""Augmentation (docs/method.md §6.7): crop sampler, boxes, flips, normalisation, recipes."""

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gr_jax.data import augment

MEAN = np.asarray(augment.CIFAR_MEAN, np.float32)
STD = np.asarray(augment.CIFAR_STD, np.float32)


def np_normalize(x, mean=MEAN, std=STD):
  return (x.astype(np.float32) / 255.0 - mean) / std


@pytest.fixture(scope="module")
def cifar_images(cifar100_npz):
  with np.load(cifar100_npz) as d:
    return d["x_train"][:512]


# ----------------------------------------------------------------------------- real CIFAR images


def test_cifar_test_is_the_normalised_identity(cifar_images):
  x = cifar_images[:64]
  out = augment.cifar_test(jnp.asarray(x))
  chex.assert_shape(out, (64, 32, 32, 3))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), np_normalize(x), rtol=1e-6, atol=1e-6)


def test_cifar_train_keeps_shape_and_dtype(cifar_images):
  x = jnp.asarray(cifar_images[:64])
  out = augment.cifar_train(jax.random.key(0), x)
  chex.assert_shape(out, (64, 32, 32, 3))
  assert out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()
  # Values stay within the normalised range of [0, 255] pixels (bilinear weights are convex).
  lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
  assert (np.asarray(out) >= lo - 1e-5).all() and (np.asarray(out) <= hi + 1e-5).all()
  bf16 = augment.cifar_test(x, dtype=jnp.bfloat16)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16, np.float32), np_normalize(np.asarray(x)),
                             atol=0.02)


def test_full_box_without_padding_is_identity_or_mirror_and_flips_half(cifar_images):
  """scale = ratio = 1 on the unpadded image: the box is the whole image, so only flips remain."""
  x = cifar_images
  out = np.asarray(augment.cifar_train(jax.random.key(1), jnp.asarray(x), padding=0,
                                       scale=(1.0, 1.0), ratio=(1.0, 1.0)))
  plain, mirror = np_normalize(x), np_normalize(x[:, :, ::-1])
  is_plain = np.abs(out - plain).max(axis=(1, 2, 3)) < 1e-5
  is_mirror = np.abs(out - mirror).max(axis=(1, 2, 3)) < 1e-5
  assert (is_plain | is_mirror).all()
  flipped = is_mirror & ~is_plain
  # 512 fair coin flips: 0.5 ± 5 standard deviations (0.11).
  assert 0.39 < flipped.mean() < 0.61, flipped.mean()


def test_integer_crop_of_the_padded_image_is_exact(cifar_images):
  """A 32×32 box in the 40×40 padded image is a pure shift: pixels copied, zeros from padding."""
  x = cifar_images[:4]
  padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
  boxes = np.array([[0, 0, 32, 32], [8, 8, 32, 32], [3, 5, 32, 32], [4, 4, 32, 32]], np.int32)
  out = np.asarray(augment.crop_and_resize(jnp.asarray(padded), jnp.asarray(boxes), 32))
  for b, (top, left, h, w) in enumerate(boxes):
    np.testing.assert_allclose(out[b], padded[b, top:top + h, left:left + w], atol=1e-4)
  np.testing.assert_allclose(out[3], x[3], atol=1e-4)  # the centre crop is the original
  flipped = np.asarray(augment.crop_and_resize(jnp.asarray(padded), jnp.asarray(boxes), 32,
                                               jnp.ones((4,), bool)))
  np.testing.assert_allclose(flipped[2], padded[2, 3:35, 5:37][:, ::-1], atol=1e-4)


def test_crop_and_resize_matches_pil_crop_then_bilinear_resize(cifar_images):
  """torchvision resized_crop on PIL = crop, then Image.resize(BILINEAR); PIL rounds to uint8."""
  image_mod = pytest.importorskip("PIL.Image")
  x = cifar_images[:32]
  padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
  boxes = augment.random_resized_crop_boxes(jax.random.key(3), 32, 40, 40)
  out = np.asarray(augment.crop_and_resize(jnp.asarray(padded), boxes, 32))
  for b, (top, left, h, w) in enumerate(np.asarray(boxes).tolist()):
    ref = image_mod.fromarray(padded[b]).crop((left, top, left + w, top + h))
    ref = np.asarray(ref.resize((32, 32), image_mod.BILINEAR), np.float32)
    # PIL: fixed-point weights and uint8 rounding of its output -> at most ~1 grey level apart.
    assert np.abs(out[b] - ref).max() <= 1.01, (b, (top, left, h, w))
  # A downscaling crop (antialiased in PIL) too.
  big = np.asarray(image_mod.fromarray(x[0]).resize((96, 96), image_mod.BICUBIC))
  box = jnp.array([[7, 11, 80, 60]], jnp.int32)
  out = np.asarray(augment.crop_and_resize(jnp.asarray(big[None]), box, 24))[0]
  ref = np.asarray(image_mod.fromarray(big).crop((11, 7, 71, 87)).resize((24, 24),
                                                                         image_mod.BILINEAR))
  assert np.abs(out - ref.astype(np.float32)).max() <= 1.01


def test_each_example_gets_its_own_crop(cifar_images):
  same = jnp.broadcast_to(jnp.asarray(cifar_images[:1]), (64, 32, 32, 3))
  out = np.asarray(augment.cifar_train(jax.random.key(5), same)).reshape(64, -1)
  distinct = len({row.tobytes() for row in out})
  assert distinct >= 60, distinct


# ----------------------------------------------------------------------------- boxes


def test_boxes_inside_image_and_within_area_and_ratio_bounds():
  boxes = np.asarray(augment.random_resized_crop_boxes(jax.random.key(0), 4096, 40, 40))
  chex.assert_shape(boxes, (4096, 4))
  assert boxes.dtype == np.int32
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
  assert (top + h <= 40).all() and (left + w <= 40).all()
  fallback = (top == 0) & (left == 0) & (h == 40) & (w == 40)
  assert fallback.mean() < 0.01
  h, w = h[~fallback].astype(float), w[~fallback].astype(float)
  # w, h are rounded: allow the half-pixel rounding of each side.
  assert ((w + 0.5) * (h + 0.5) >= 0.08 * 1600).all()
  assert ((w - 0.5) / (h + 0.5) <= 4 / 3).all() and ((w + 0.5) / (h - 0.5) >= 3 / 4).all()
  # The area fraction is spread over the whole scale range, not stuck at one value.
  frac = w * h / 1600
  assert frac.min() < 0.12 and frac.max() > 0.9
  # Positions are spread out: small boxes are not all in one corner.
  small = frac < 0.3
  assert len(np.unique(top[~fallback][small])) > 20


def test_boxes_fall_back_to_clamped_centre_crop():
  # Very wide image and large area: h = √(area/r) > 10 for every candidate -> fallback, with
  # the aspect ratio clamped to 4/3: h = 10, w = round(13.33) = 13, centred.
  boxes = np.asarray(augment.random_resized_crop_boxes(jax.random.key(0), 8, 10, 100,
                                                       scale=(0.9, 1.0)))
  np.testing.assert_array_equal(boxes, np.tile([[0, 43, 10, 13]], (8, 1)))


def test_bad_box_ranges_raise():
  with pytest.raises(ValueError, match="scale"):
    augment.random_resized_crop_boxes(jax.random.key(0), 2, 8, 8, scale=(0.5, 0.1))


# ----------------------------------------------------------------------------- ImageNet recipe


def test_imagenet_shapes_and_centre_crop():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, size=(2, 256, 256, 3), dtype=np.uint8)
  train = augment.imagenet_train(jax.random.key(0), jnp.asarray(x), size=224)
  chex.assert_shape(train, (2, 224, 224, 3))
  assert train.dtype == jnp.float32
  test = augment.imagenet_test(jnp.asarray(x), size=224)
  chex.assert_shape(test, (2, 224, 224, 3))
  mean, std = np.asarray(augment.IMAGENET_MEAN), np.asarray(augment.IMAGENET_STD)
  np.testing.assert_allclose(np.asarray(test), np_normalize(x[:, 16:240, 16:240], mean, std),
                             atol=1e-5)
  # Stored smaller than the crop: resized up instead.
  up = augment.imagenet_test(jnp.asarray(x[:, :64, :64]), size=96)
  chex.assert_shape(up, (2, 96, 96, 3))


class JitAgreementTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    # Same shape as the real-data tests' batches, so the compiled programs are shared.
    self.small = jnp.asarray(rng.integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8))
    self.large = jnp.asarray(rng.integers(0, 256, size=(2, 80, 80, 3), dtype=np.uint8))

  @chex.variants(with_jit=True, without_jit=True)
  def test_cifar_train(self):
    out = self.variant(augment.cifar_train)(jax.random.key(7), self.small)
    ref = augment.cifar_train(jax.random.key(7), self.small)
    chex.assert_shape(out, (64, 32, 32, 3))
    chex.assert_trees_all_close(out, ref, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_imagenet_train_and_test(self):
    train = self.variant(lambda k, x: augment.imagenet_train(k, x, size=64))
    out = train(jax.random.key(2), self.large)
    ref = augment.imagenet_train(jax.random.key(2), self.large, size=64)
    chex.assert_shape(out, (2, 64, 64, 3))
    chex.assert_trees_all_close(out, ref, atol=1e-5)
    test = self.variant(lambda x: augment.imagenet_test(x, size=64))(self.large)
    chex.assert_trees_all_close(test, augment.imagenet_test(self.large, size=64), atol=1e-6)

  def test_vmap_over_seeds_equals_separate_calls(self):
    train, _ = augment.get_augmentation("cifar", 32)
    keys = jax.random.split(jax.random.key(0), 2)
    images = jnp.stack([self.small] * 2)
    out = jax.jit(jax.vmap(train))(keys, images)
    chex.assert_shape(out, (2, 64, 32, 32, 3))
    for s in range(2):
      chex.assert_trees_all_close(out[s], train(keys[s], self.small), atol=1e-5)
    self.assertFalse(np.allclose(out[0], out[1]))


class RecipeTest(absltest.TestCase):

  def test_get_augmentation(self):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8))
    train, test = augment.get_augmentation("cifar", 32)
    out = train(jax.random.key(0), x)
    chex.assert_shape(out, (64, 32, 32, 3))
    chex.assert_trees_all_close(out, augment.cifar_train(jax.random.key(0), x), atol=1e-6)
    np.testing.assert_allclose(test(x), np_normalize(np.asarray(x)), atol=1e-6)
    train, test = augment.get_augmentation("imagenet", 24)
    chex.assert_shape(train(jax.random.key(0), x), (64, 24, 24, 3))
    chex.assert_shape(test(x), (64, 24, 24, 3))

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "cifar, imagenet"):
      augment.get_augmentation("autoaugment", 32)
    _, test = augment.get_augmentation("cifar", 32)
    with self.assertRaisesRegex(ValueError, "image_size"):
      test(jnp.zeros((1, 64, 64, 3), jnp.uint8))
    with self.assertRaisesRegex(ValueError, r"\[B, H, W, 3\]"):
      augment.cifar_test(jnp.zeros((32, 32, 3), jnp.uint8))


if __name__ == "__main__":
  absltest.main()
