"""Losses and per-phase constants against NumPy oracles written from docs/method.md §2–§3."""

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np

import gr_jax


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def oracle_prior_ce(logits, labels, counts):
  seen = counts > 0
  z = logits[:, seen] + np.log(counts[seen] / counts[seen].sum())
  position = np.cumsum(seen) - 1
  return -np_log_softmax(z)[np.arange(len(labels)), position[labels]].mean()


def oracle_dakd(z, zhat, old, lost, t):
  z, zhat, lost = z[:, old], zhat[:, old], lost[old]
  p = (lost + 0.001) / (lost + 0.001).sum()
  h = -(p * np.log(p)).sum() / np.log(old.sum())
  w = lost / np.linalg.norm(lost)
  mixed = w * z + (1 - w) * zhat
  target = np.exp(np_log_softmax(zhat / t))
  per = -(target * (h * np_log_softmax(z / t) + (1 - h) * np_log_softmax(mixed / t))).sum(-1)
  return per.mean()


def oracle_kd(z, zhat, old, t):
  target = np.exp(np_log_softmax(zhat[:, old] / t))
  return -(target * np_log_softmax(z[:, old] / t)).sum(-1).mean()


class LossesTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.z = rng.normal(size=(6, 10)) * 3
    self.zhat = rng.normal(size=(6, 10)) * 3
    self.old = np.arange(10) < 6
    self.lost = np.array([400, 0, 37, 5, 120, 0, 0, 0, 0, 0], np.float64)

  @chex.variants(with_jit=True, without_jit=True)
  def test_prior_adjusted_ce(self):
    counts = np.array([500, 20, 20, 3, 80, 7, 0, 0, 0, 0], np.float64)
    labels = np.array([0, 1, 3, 5, 4, 2])
    loss = self.variant(gr_jax.prior_adjusted_cross_entropy)(
        jnp.asarray(self.z, jnp.float32), jnp.asarray(labels), jnp.asarray(counts))
    np.testing.assert_allclose(loss, oracle_prior_ce(self.z, labels, counts), rtol=1e-5)

  def test_prior_ce_unseen_classes_get_no_gradient_and_weights_drop_padding(self):
    counts = jnp.array([5.0, 5.0, 2.0, 0.0, 0.0])
    z = jnp.asarray(self.z[:, :5], jnp.float32)
    labels = jnp.array([0, 1, 2, 0, 1, 2])
    grad = jax.grad(gr_jax.prior_adjusted_cross_entropy)(z, labels, counts)
    self.assertTrue(np.all(np.isfinite(grad)))
    np.testing.assert_array_equal(np.asarray(grad)[:, 3:], 0.0)
    weights = jnp.array([1, 1, 1, 0, 0, 0])
    padded = gr_jax.prior_adjusted_cross_entropy(z, labels, counts, weights)
    first = gr_jax.prior_adjusted_cross_entropy(z[:3], labels[:3], counts)
    np.testing.assert_allclose(padded, first, rtol=1e-6)

  def test_uniform_counts_give_plain_ce(self):
    labels = jnp.array([0, 1, 2, 3, 0, 1])
    counts = jnp.array([1.0, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    loss = gr_jax.prior_adjusted_cross_entropy(jnp.asarray(self.z, jnp.float32), labels, counts)
    expected = -np_log_softmax(self.z[:, :4])[np.arange(6), np.asarray(labels)].mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_dakd_matches_oracle(self):
    loss = self.variant(gr_jax.distribution_aware_kd)(
        jnp.asarray(self.z, jnp.float32), jnp.asarray(self.zhat, jnp.float32),
        jnp.asarray(self.old), jnp.asarray(self.lost), 2.0)
    np.testing.assert_allclose(loss, oracle_dakd(self.z, self.zhat, self.old, self.lost, 2.0),
                               rtol=1e-5)

  def test_dakd_without_lost_data_is_plain_kd_not_nan(self):
    z, zhat = jnp.asarray(self.z, jnp.float32), jnp.asarray(self.zhat, jnp.float32)
    zero = jnp.zeros(10)
    dakd = gr_jax.distribution_aware_kd(z, zhat, jnp.asarray(self.old), zero, 2.0)
    kd = gr_jax.knowledge_distillation(z, zhat, jnp.asarray(self.old), 2.0)
    self.assertTrue(np.isfinite(dakd))
    np.testing.assert_allclose(dakd, kd, rtol=1e-6)
    np.testing.assert_allclose(kd, oracle_kd(self.z, self.zhat, self.old, 2.0), rtol=1e-5)
    grad = jax.grad(gr_jax.distribution_aware_kd)(z, zhat, jnp.asarray(self.old), zero, 2.0)
    self.assertTrue(np.all(np.isfinite(grad)))
    np.testing.assert_array_equal(np.asarray(grad)[:, 6:], 0.0)

  def test_dakd_gradient_flows_to_student_only(self):
    z, zhat = jnp.asarray(self.z, jnp.float32), jnp.asarray(self.zhat, jnp.float32)
    args = (jnp.asarray(self.old), jnp.asarray(self.lost), 2.0)
    grad_teacher = jax.grad(gr_jax.distribution_aware_kd, argnums=1)(z, zhat, *args)
    np.testing.assert_array_equal(grad_teacher, 0.0)
    grad_student = jax.grad(gr_jax.distribution_aware_kd)(z, zhat, *args)
    self.assertGreater(float(jnp.abs(grad_student).sum()), 0.0)

  def test_entropy_bounds(self):
    old = jnp.asarray(self.old)
    h = gr_jax.lost_count_entropy(jnp.asarray(self.lost), old)
    self.assertTrue(0.0 < float(h) < 1.0)
    p = (self.lost[:6] + 1e-3) / (self.lost[:6] + 1e-3).sum()
    np.testing.assert_allclose(h, -(p * np.log(p)).sum() / np.log(6), rtol=1e-5)
    self.assertAlmostEqual(float(gr_jax.lost_count_entropy(jnp.full(10, 7.0), old)), 1.0, places=6)


class PhaseConstantsTest(absltest.TestCase):

  def test_constants_match_method_section_2(self):
    counts = np.array([500, 300, 15, 8, 40, 30, 20, 0])
    c = gr_jax.phase_constants(counts, num_old=4, num_new=3, memory_per_class=20)
    np.testing.assert_array_equal(c.old_classes, [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(c.new_classes, [0, 0, 0, 0, 1, 1, 1, 0])
    np.testing.assert_allclose(c.class_counts, [20, 20, 15, 8, 40, 30, 20, 0])
    np.testing.assert_allclose(c.lost_counts, [480, 280, 0, 0, 0, 0, 0, 0])
    n_seen, n_new = 823.0, 90.0
    np.testing.assert_allclose(c.gamma, np.exp(-n_seen / (n_seen + n_new)), rtol=1e-6)
    np.testing.assert_allclose(c.kd_weight, 0.7 * np.sqrt(n_seen / n_new) * 4.0, rtol=1e-6)

  def test_base_phase_has_no_kd(self):
    c = gr_jax.phase_constants(np.array([5, 6, 0]), num_old=0, num_new=2, memory_per_class=20)
    self.assertEqual(float(c.kd_weight), 0.0)
    self.assertEqual(float(c.gamma), 1.0)
    np.testing.assert_allclose(c.class_counts, [5, 6, 0])

  def test_inconsistent_arguments_are_refused(self):
    counts = np.array([10, 10, 10])
    for kwargs, says in ((dict(num_old=2, num_new=2, memory_per_class=5), "do not fit the 3"),
                         (dict(num_old=1, num_new=0, memory_per_class=5), "num_new >= 1"),
                         (dict(num_old=1, num_new=2, memory_per_class=0), "memory_per_class=0")):
      with self.assertRaisesRegex(ValueError, says):
        gr_jax.phase_constants(counts, **kwargs)
    for bad in (np.array([10, -1, 10]), np.ones((2, 3)), np.array([10, np.nan, 1])):
      with self.assertRaisesRegex(ValueError, "one non-negative count per class"):
        gr_jax.phase_constants(bad, num_old=0, num_new=2, memory_per_class=5)
    # The base phase keeps no memory yet, so M = 0 is fine there.
    c = gr_jax.phase_constants(counts, num_old=0, num_new=3, memory_per_class=0)
    np.testing.assert_allclose(c.class_counts, [10, 10, 10])


if __name__ == "__main__":
  absltest.main()
