"""Herding and exemplar selection (docs/method.md §6.6) against a NumPy greedy oracle."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gr_jax import exemplars


def oracle_herding(features, m):
  """§6.6 literally: normalise, μ = mean, greedily minimise ‖μ − (f + Σ selected)/(k+1)‖₂."""
  f = np.asarray(features, np.float64)
  f = f / np.linalg.norm(f, axis=1, keepdims=True)
  mu = f.mean(axis=0)
  selected, total = [], np.zeros(f.shape[1])
  for k in range(min(m, len(f))):
    best, best_dist = None, np.inf
    for i in range(len(f)):
      if i in selected:
        continue
      dist = np.linalg.norm(mu - (f[i] + total) / (k + 1))
      if dist < best_dist:
        best, best_dist = i, dist
    selected.append(best)
    total += f[best]
  return np.array(selected + [-1] * (m - len(selected)))


@pytest.fixture(scope="module")
def cifar_features(cifar100_npz):
  """Deterministic cheap "features": a fixed random projection of the pixels of real images.

  Returns (features [N, 32], labels [N], ids [N]) for the first 40, 25 and 7 training images of
  classes 3, 11 and 42, with ids = their indices in the CIFAR-100 training set.
  """
  with np.load(cifar100_npz) as d:
    x, y = d["x_train"], d["y_train"].reshape(-1)
  ids = np.concatenate([np.flatnonzero(y == c)[:n] for c, n in ((3, 40), (11, 25), (42, 7))])
  projection = np.random.default_rng(0).normal(size=(32 * 32 * 3, 32)) / np.sqrt(3072)
  pixels = x[ids].reshape(len(ids), -1).astype(np.float64) / 255.0
  return (pixels @ projection).astype(np.float32), y[ids], ids


class TestHerdingSelection:

  def test_matches_numpy_oracle_jit_and_eager(self, cifar_features):
    feats = cifar_features[0][:40]
    expected = oracle_herding(feats, 20)
    valid = jnp.ones((40,), bool)
    for fn in (exemplars.herding_selection, jax.jit(exemplars.herding_selection,
                                                    static_argnums=2)):
      got = fn(jnp.asarray(feats), valid, 20)
      chex.assert_shape(got, (20,))
      assert got.dtype == jnp.int32
      np.testing.assert_array_equal(np.asarray(got), expected)

  def test_never_picks_twice_and_ignores_padding(self, cifar_features):
    feats = cifar_features[0][:40]
    # Padding rows with huge, class-mean-like features: they must never be picked and must
    # not move μ.
    pad = np.tile(feats.mean(0, keepdims=True) * 100, (24, 1))
    padded = np.concatenate([feats, pad])
    valid = np.arange(64) < 40
    got = np.asarray(exemplars.herding_selection(jnp.asarray(padded), jnp.asarray(valid), 40))
    np.testing.assert_array_equal(np.sort(got), np.arange(40))  # a permutation of the valid rows
    np.testing.assert_array_equal(got, oracle_herding(feats, 40))

  def test_fewer_valid_rows_than_m_gives_all_then_minus_one(self, cifar_features):
    feats = cifar_features[0][:7]
    got = np.asarray(exemplars.herding_selection(jnp.asarray(feats), jnp.ones((7,), bool), 20))
    np.testing.assert_array_equal(got[:7], oracle_herding(feats, 7))
    np.testing.assert_array_equal(got[7:], -np.ones(13))

  def test_scale_invariant_rows(self, cifar_features):
    """Features are L2-normalised inside: rescaling rows does not change the selection."""
    feats = cifar_features[0][:40]
    scales = np.random.default_rng(1).uniform(0.1, 10.0, size=(40, 1)).astype(np.float32)
    a = exemplars.herding_selection(jnp.asarray(feats), jnp.ones((40,), bool), 10)
    b = exemplars.herding_selection(jnp.asarray(feats * scales), jnp.ones((40,), bool), 10)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class TestSelectExemplars:

  def test_herding_per_class_maps_to_ids_and_pads_small_class(self, cifar_features):
    feats, labels, ids = cifar_features
    out = exemplars.select_exemplars(feats, labels, ids, [11, 3, 42], per_class=20)
    chex.assert_shape(out, (3, 20))
    assert out.dtype == np.int64
    for row, c in zip(out, (11, 3, 42)):
      rows = np.flatnonzero(labels == c)
      expected = oracle_herding(feats[rows], 20)
      np.testing.assert_array_equal(row, np.where(expected >= 0, ids[rows][expected], -1))
    # Class 42 has 7 images (< M = 20): all kept, then -1.
    np.testing.assert_array_equal(np.sort(out[2, :7]), np.sort(ids[labels == 42]))
    np.testing.assert_array_equal(out[2, 7:], -np.ones(13))
    assert (out[:2] >= 0).all()

  def test_vmap_over_classes_equals_per_class_calls(self, cifar_features):
    feats, labels, ids = cifar_features
    together = exemplars.select_exemplars(feats, labels, ids, [3, 11, 42], per_class=5)
    for i, c in enumerate((3, 11, 42)):
      alone = exemplars.select_exemplars(feats, labels, ids, [c], per_class=5)
      np.testing.assert_array_equal(together[i], alone[0])
      rows = np.flatnonzero(labels == c)
      direct = exemplars.herding_selection(jnp.asarray(feats[rows]),
                                           jnp.ones((rows.size,), bool), 5)
      np.testing.assert_array_equal(together[i], ids[rows][np.asarray(direct)])

  def test_random_picks_distinct_valid_ids(self, cifar_features):
    feats, labels, ids = cifar_features
    out = exemplars.select_exemplars(feats, labels, ids, [3, 11, 42], 20, "random",
                                     jax.random.key(0))
    chex.assert_shape(out, (3, 20))
    for row, c in zip(out, (3, 11, 42)):
      kept = row[row >= 0]
      assert kept.size == min(20, int((labels == c).sum()))
      assert len(set(kept.tolist())) == kept.size
      assert set(kept.tolist()) <= set(ids[labels == c].tolist())
    np.testing.assert_array_equal(out[2, 7:], -np.ones(13))
    again = exemplars.select_exemplars(feats, labels, ids, [3, 11, 42], 20, "random",
                                       jax.random.key(0))
    np.testing.assert_array_equal(out, again)
    other = exemplars.select_exemplars(feats, labels, ids, [3, 11, 42], 20, "random",
                                       jax.random.key(1))
    assert not np.array_equal(out[0], other[0])

  @pytest.mark.parametrize("per_class", [0, -3, 2.5, True, "20"])
  def test_bad_per_class(self, cifar_features, per_class):
    feats, labels, ids = cifar_features
    with pytest.raises(ValueError, match="positive integer"):
      exemplars.select_exemplars(feats, labels, ids, [3], per_class)

  def test_other_errors(self, cifar_features):
    feats, labels, ids = cifar_features
    with pytest.raises(ValueError, match="herding, random"):
      exemplars.select_exemplars(feats, labels, ids, [3], 20, method="kmeans")
    with pytest.raises(ValueError, match=r"classes \[99\] have no rows"):
      exemplars.select_exemplars(feats, labels, ids, [3, 99], 20)
    with pytest.raises(ValueError, match="PRNG key"):
      exemplars.select_exemplars(feats, labels, ids, [3], 20, method="random")
    with pytest.raises(ValueError, match="same N"):
      exemplars.select_exemplars(feats, labels[:-1], ids, [3], 20)
