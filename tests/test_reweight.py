"""The GR/DGR optax transform against a NumPy oracle written from docs/method.md §4."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax.core import FrozenDict
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gr_jax


def oracle_step(phi, w_ce, b_ce, old, new, gamma=1.0, w_kd=None, b_kd=None):
  """One GR/DGR step of method.md §4 in float64 NumPy. Returns (w, b, phi, s, beta)."""
  seen = old | new
  g = np.sqrt((w_ce.astype(np.float64) ** 2).sum(0))
  phi = phi + np.where(seen, g, 0.0)
  alpha = np.zeros_like(phi)
  for group in (old, new):
    if group.any():
      alpha[group] = phi[group].min() / phi[group]
  if old.any():
    q = phi[new].mean() / phi[old].mean()
    r_old, r_new = min(1.0, q), min(1.0, gamma * q)
  else:
    r_old = r_new = 1.0
  s = np.where(old, alpha * r_old, np.where(new, alpha * r_new, 0.0))
  w = w_ce * s
  b = b_ce * s
  beta = 0.0
  if w_kd is not None:
    h = np.sqrt((w_kd.astype(np.float64) ** 2).sum(0))
    beta = np.linalg.norm((s * g)[seen]) / np.linalg.norm(h[old])
    w = w + np.where(old, beta, 0.0) * w_kd
    b = b + np.where(old, beta, 0.0) * b_kd
  return w, b, phi, s, beta


def random_grads(seed, dim=6, num_classes=7, scale=None):
  rng = np.random.default_rng(seed)
  scale = np.ones(num_classes) if scale is None else scale
  return (rng.normal(size=(dim, num_classes)) * scale).astype(np.float32), (
      rng.normal(size=(num_classes,)) * scale).astype(np.float32)


def params_like(w, b):
  return {"backbone": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros((4,))},
          "classifier": {"kernel": jnp.zeros_like(w), "bias": jnp.zeros_like(b)}}


def select_classifier(tree):
  return {"backbone": jax.tree.map(lambda _: False, tree["backbone"]),
          "classifier": jax.tree.map(lambda _: True, tree["classifier"])}


def dgr_inputs(seed, num_classes, scale=None):
  """Params, CE gradients and KD gradients (zero for the backbone) with random classifier rows."""
  w, b = random_grads(seed, num_classes=num_classes, scale=scale)
  wk, bk = random_grads(seed + 1, num_classes=num_classes)
  grads = {"backbone": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
           "classifier": {"kernel": w, "bias": b}}
  kd = {"backbone": jax.tree.map(jnp.zeros_like, grads["backbone"]),
        "classifier": {"kernel": wk, "bias": bk}}
  return params_like(w, b), grads, kd


class ReweightTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_intra_phase_gr_matches_oracle_over_steps(self):
    tx = gr_jax.gradient_reweighting(select_classifier)
    w0, b0 = random_grads(0)
    state = tx.init(params_like(w0, b0))
    update = self.variant(tx.update)
    phi = np.zeros(7)
    everyone = np.ones(7, bool)
    for step in range(4):
      w, b = random_grads(step, scale=np.linspace(0.2, 3.0, 7))
      grads = {"backbone": {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.ones((4,))},
               "classifier": {"kernel": w, "bias": b}}
      out, state = update(grads, state)
      ew, eb, phi, es, _ = oracle_step(phi, w, b, ~everyone, everyone)
      chex.assert_trees_all_close(out["classifier"]["kernel"], ew, rtol=1e-5, atol=1e-6)
      chex.assert_trees_all_close(out["classifier"]["bias"], eb, rtol=1e-5, atol=1e-6)
      chex.assert_trees_all_close(state.cumulative_norms, phi, rtol=1e-5)
      chex.assert_trees_all_close(state.class_scale, es, rtol=1e-5)
      # Non-classifier leaves pass through bit-identical.
      np.testing.assert_array_equal(out["backbone"]["kernel"], grads["backbone"]["kernel"])
      np.testing.assert_array_equal(out["backbone"]["bias"], grads["backbone"]["bias"])

  @chex.variants(with_jit=True, without_jit=True)
  def test_dgr_matches_oracle_with_unseen_classes(self):
    tx = gr_jax.gradient_reweighting(select_classifier)
    w0, b0 = random_grads(0, num_classes=9)
    state = tx.init(params_like(w0, b0))
    old = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0], bool)
    new = np.array([0, 0, 0, 0, 1, 1, 1, 0, 0], bool)
    gamma = float(np.exp(-0.8))
    update = self.variant(functools.partial(tx.update, gamma=gamma))
    phi = np.zeros(9)
    for step in range(3):
      w, b = random_grads(10 + step, num_classes=9, scale=np.linspace(0.1, 2.0, 9))
      wk, bk = random_grads(20 + step, num_classes=9)
      grads = {"backbone": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
               "classifier": {"kernel": w, "bias": b}}
      kd = {"backbone": jax.tree.map(jnp.zeros_like, grads["backbone"]),
            "classifier": {"kernel": wk, "bias": bk}}
      out, state = update(grads, state, old_classes=old, new_classes=new, kd_updates=kd)
      ew, eb, phi, es, ebeta = oracle_step(phi, w, b, old, new, gamma, wk, bk)
      chex.assert_trees_all_close(out["classifier"]["kernel"], ew, rtol=1e-5, atol=1e-6)
      chex.assert_trees_all_close(out["classifier"]["bias"], eb, rtol=1e-5, atol=1e-6)
      chex.assert_trees_all_close(state.class_scale, es, rtol=1e-5)
      chex.assert_trees_all_close(state.kd_scale, ebeta, rtol=1e-5)
      # Unseen classes get a zero update and keep Φ = 0.
      np.testing.assert_array_equal(np.asarray(out["classifier"]["kernel"])[:, 7:], 0.0)
      np.testing.assert_array_equal(np.asarray(state.cumulative_norms)[7:], 0.0)

  def test_alpha_properties(self):
    tx = gr_jax.gradient_reweighting()
    w, b = random_grads(3, num_classes=11, scale=np.geomspace(0.01, 10.0, 11))
    state = tx.init({"kernel": w, "bias": b})
    _, state = tx.update({"kernel": w, "bias": b}, state)
    alpha = np.asarray(state.class_scale)
    self.assertTrue(np.all(alpha > 0) and np.all(alpha <= 1.0))
    least = np.argmin(np.asarray(state.cumulative_norms))
    self.assertEqual(alpha[least], 1.0)
    self.assertLess(alpha.min(), 0.05)  # the head class is slowed down strongly

  def test_default_mode_ignores_classes_without_gradient(self):
    """A 10-class head of which the loss sees 5 (prior-adjusted CE, count 0 for the rest): with no
    masks passed, the 5 zero-gradient rows must not pull the minimum to 0 and stop every class."""
    counts = jnp.array([300.0, 100.0, 30.0, 10.0, 3.0, 0, 0, 0, 0, 0])
    feats = jax.random.normal(jax.random.PRNGKey(0), (64, 8))
    labels = jax.random.randint(jax.random.PRNGKey(1), (64,), 0, 5)
    params = {"kernel": 0.1 * jax.random.normal(jax.random.PRNGKey(2), (8, 10)),
              "bias": jnp.zeros(10)}
    loss = lambda p: gr_jax.prior_adjusted_cross_entropy(feats @ p["kernel"] + p["bias"], labels,
                                                         counts)
    grads = jax.grad(loss)(params)
    np.testing.assert_array_equal(np.asarray(grads["kernel"])[:, 5:], 0.0)
    tx = gr_jax.gradient_reweighting()
    out, state = tx.update(grads, tx.init(params))
    seen = np.asarray(counts) > 0
    _, _, _, expected, _ = oracle_step(np.zeros(10), np.asarray(grads["kernel"]),
                                       np.asarray(grads["bias"]), np.zeros(10, bool), seen)
    np.testing.assert_allclose(np.asarray(state.class_scale)[seen], expected[seen], rtol=1e-5)
    self.assertEqual(float(np.max(np.asarray(state.class_scale)[seen])), 1.0)
    # The same as passing the seen classes explicitly.
    masked_out, _ = tx.update(grads, tx.init(params), new_classes=seen)
    chex.assert_trees_all_close(out, masked_out)

  def test_balanced_gradients_give_uniform_scales(self):
    tx = gr_jax.gradient_reweighting()
    w = np.tile(np.array([[1.0], [2.0], [-2.0]], np.float32), (1, 5))
    b = np.ones(5, np.float32)
    state = tx.init({"kernel": w, "bias": b})
    out, state = tx.update({"kernel": w, "bias": b}, state)
    np.testing.assert_allclose(state.class_scale, np.ones(5))
    np.testing.assert_allclose(out["kernel"], w)

  def test_permuting_classes_permutes_result(self):
    tx = gr_jax.gradient_reweighting()
    w, b = random_grads(5, num_classes=8, scale=np.linspace(0.5, 4, 8))
    wk, bk = random_grads(6, num_classes=8)
    old = np.array([1, 1, 1, 0, 0, 0, 1, 0], bool)
    perm = np.random.default_rng(0).permutation(8)

    def run(w, b, wk, bk, old):
      state = tx.init({"kernel": w, "bias": b})
      out, state = tx.update({"kernel": w, "bias": b}, state, old_classes=old,
                             kd_updates={"kernel": wk, "bias": bk}, gamma=0.6)
      return out, state

    out, state = run(w, b, wk, bk, old)
    out_p, state_p = run(w[:, perm], b[perm], wk[:, perm], bk[perm], old[perm])
    chex.assert_trees_all_close(out_p["kernel"], np.asarray(out["kernel"])[:, perm], rtol=1e-6)
    chex.assert_trees_all_close(out_p["bias"], np.asarray(out["bias"])[perm], rtol=1e-6)
    chex.assert_trees_all_close(state_p.class_scale, np.asarray(state.class_scale)[perm])

  def test_bf16_gradients_accumulate_float32_norms(self):
    tx = gr_jax.gradient_reweighting()
    w, b = random_grads(7, num_classes=5, scale=np.linspace(1, 5, 5))
    grads = {"kernel": jnp.asarray(w, jnp.bfloat16), "bias": jnp.asarray(b, jnp.bfloat16)}
    state = tx.init(grads)
    out, state = jax.jit(tx.update)(grads, state)
    self.assertEqual(out["kernel"].dtype, jnp.bfloat16)
    self.assertEqual(state.cumulative_norms.dtype, jnp.float32)
    expected = np.sqrt((np.asarray(grads["kernel"], np.float64) ** 2).sum(0))
    np.testing.assert_allclose(state.cumulative_norms, expected, rtol=1e-5)

  def test_composes_with_masked_chain_and_inject_hyperparams(self):
    w, b = random_grads(8, num_classes=6, scale=np.linspace(0.3, 3, 6))
    params = params_like(w, b)
    grads = {"backbone": {"kernel": jnp.full((3, 4), 0.5), "bias": jnp.ones((4,))},
             "classifier": {"kernel": w, "bias": b}}
    mask = select_classifier(params)
    by_selector = optax.chain(gr_jax.gradient_reweighting(select_classifier),
                              optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    by_masked = optax.chain(optax.masked(gr_jax.gradient_reweighting(), mask),
                            optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    injected = optax.inject_hyperparams(
        lambda learning_rate: optax.chain(gr_jax.gradient_reweighting(select_classifier),
                                          optax.add_decayed_weights(5e-4),
                                          optax.sgd(learning_rate, momentum=0.9)))(0.1)
    results = []
    for tx in (by_selector, by_masked, injected):
      state = tx.init(params)
      out, state = jax.jit(tx.update)(grads, state, params)
      out, state = jax.jit(tx.update)(grads, state, params)
      results.append(out)
    chex.assert_trees_all_close(results[0], results[1], rtol=1e-6)
    chex.assert_trees_all_close(results[0], results[2], rtol=1e-6)
    # Backbone: plain SGD with weight decay and momentum on the unmodified gradient (2 steps).
    g = 0.5 + 5e-4 * 1.0
    np.testing.assert_allclose(results[0]["backbone"]["kernel"], -0.1 * (g + 0.9 * g), rtol=1e-6)

  def test_dgr_kd_updates_through_masked(self):
    params, grads, kd = dgr_inputs(9, num_classes=6)
    old = np.array([1, 1, 0, 0, 0, 0], bool)
    direct = gr_jax.gradient_reweighting(select_classifier)
    masked = optax.masked(gr_jax.gradient_reweighting(), select_classifier(params),
                          mask_compatible_extra_args=True)
    outs = []
    for tx in (direct, masked):
      out, _ = tx.update(grads, tx.init(params), old_classes=old, kd_updates=kd, gamma=0.5)
      outs.append(out)
    chex.assert_trees_all_close(outs[0], outs[1], rtol=1e-6)

  def test_no_classifier_selected_is_a_clear_error(self):
    tx = gr_jax.gradient_reweighting(lambda p: jax.tree.map(lambda _: False, p))
    with self.assertRaisesRegex(ValueError, "no classifier weight leaf"):
      tx.init({"kernel": jnp.ones((2, 3))})

  def test_misused_extra_args_are_clear_errors(self):
    w, b = random_grads(11, num_classes=5)
    params = params_like(w, b)
    grads = {"backbone": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
             "classifier": {"kernel": w, "bias": b}}
    tx = gr_jax.gradient_reweighting(select_classifier)
    state = tx.init(params)
    with self.assertRaisesRegex(ValueError, r"new_classes has shape \(1,\); expected \(5,\)"):
      tx.update(grads, state, new_classes=np.array([True]))
    with self.assertRaisesRegex(ValueError, "kd_updates needs old_classes"):
      tx.update(grads, state, kd_updates=grads)


def flax_params_and_grads(seed=12, num_classes=6):
  """Params shaped like a Flax model's variables ({'params': {...}}), their CE and KD gradients."""
  w, b = random_grads(seed, num_classes=num_classes, scale=np.linspace(0.3, 3, num_classes))
  wk, bk = random_grads(seed + 1, num_classes=num_classes)
  backbone = {"conv": {"kernel": jnp.ones((3, 4))}, "bn": {"scale": jnp.ones((4,))}}
  params = {"params": {"backbone": backbone,
                       "head": {"kernel": jnp.zeros_like(w), "bias": jnp.zeros_like(b)}}}
  grads = {"params": {"backbone": jax.tree.map(lambda x: 0.5 * x, backbone),
                      "head": {"kernel": w, "bias": b}}}
  kd = {"params": {"backbone": jax.tree.map(jnp.zeros_like, backbone),
                   "head": {"kernel": wk, "bias": bk}}}
  return params, grads, kd


FULL_HEAD_MASK = {"params": {"backbone": {"conv": {"kernel": False}, "bn": {"scale": False}},
                             "head": {"kernel": True, "bias": True}}}


def two_dgr_steps(tx, params, grads, kd, update=None):
  """Two jitted DGR steps; returns the second step's updates and state."""
  update = jax.jit(tx.update) if update is None else update
  old = np.array([1, 1, 1, 0, 0, 0], bool)
  state = tx.init(params)
  for _ in range(2):
    out, state = update(grads, state, params, old_classes=old, kd_updates=kd, gamma=0.5)
  return out, state


class NoNewClassTest(chex.TestCase, parameterized.TestCase):
  """Old classes but no new one: §4's q divides by the new group's mean Φ, which is undefined."""

  @parameterized.named_parameters(
      ("new_all_false", [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]),
      ("new_equals_old", [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]),
      ("all_old", [1, 1, 1, 1, 1], None),
      ("no_class_at_all", None, [0, 0, 0, 0, 0]),
  )
  def test_concrete_masks_without_new_class_raise(self, old, new):
    w, b = random_grads(13, num_classes=5)
    grads = {"kernel": w, "bias": b}
    tx = gr_jax.gradient_reweighting()
    masks = {name: None if m is None else np.array(m, bool)
             for name, m in (("old_classes", old), ("new_classes", new))}
    with self.assertRaisesRegex(ValueError, "select no new class"):
      tx.update(grads, tx.init(grads), **masks)
    # Masks closed over by a jitted function are concrete at trace time and are checked too.
    with self.assertRaisesRegex(ValueError, "select no new class"):
      jax.jit(functools.partial(tx.update, **{k: jnp.asarray(m) for k, m in masks.items()
                                              if m is not None}))(grads, tx.init(grads))

  def test_traced_masks_without_new_class_zero_the_classifier_update(self):
    """The documented behaviour under jit, where the masks cannot be read."""
    params, grads, kd = dgr_inputs(14, num_classes=5, scale=np.linspace(0.5, 2, 5))
    tx = gr_jax.gradient_reweighting(select_classifier)
    old = jnp.array([1, 1, 0, 0, 0], bool)
    out, state = jax.jit(tx.update)(grads, tx.init(params), old_classes=old,
                                    new_classes=jnp.zeros(5, bool), kd_updates=kd)
    zeros = jax.tree.map(jnp.zeros_like, params["classifier"])
    chex.assert_trees_all_equal(out["classifier"], zeros)
    chex.assert_trees_all_equal(out["backbone"], grads["backbone"])
    np.testing.assert_array_equal(state.class_scale, 0.0)
    self.assertEqual(float(state.kd_scale), 0.0)
    g = np.linalg.norm(grads["classifier"]["kernel"], axis=0)
    np.testing.assert_allclose(state.cumulative_norms, np.where(old, g, 0.0), rtol=1e-6)


class UndefinedQTest(chex.TestCase, parameterized.TestCase):
  """Where §4's q = mean_new Φ / mean_old Φ is undefined: the convention of docs/method.md §4."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      # Old class 0, new class 1, first step; weight gradient columns [old, new]; the KD row of
      # class 0 has norm 1, so β = ‖s·g‖ = s_1·g_1.
      ("zero_over_zero", [[0.0, 0.0], [0.0, 0.0]], [1.0, 1.0], 1.0, 0.0),  # mean_old Φ = 0: r = 1
      ("positive_over_zero", [[0.0, 3.0], [0.0, 4.0]], [1.0, 1.0], 1.0, 5.0),  # the limit q → ∞
      ("zero_over_positive", [[3.0, 0.0], [4.0, 0.0]], [0.0, 0.0], 0.0, 0.0),  # q = 0 as written
  )
  def test_group_factors_are_the_documented_values(self, kernel, expected_scale, expected_r,
                                                    expected_beta):
    grads = {"kernel": jnp.asarray(kernel), "bias": jnp.array([1.0, -1.0])}
    kd = {"kernel": jnp.asarray([[1.0, 0.0], [0.0, 0.0]]), "bias": jnp.array([0.5, 0.0])}
    old, new = np.array([True, False]), np.array([False, True])
    tx = gr_jax.gradient_reweighting()
    update = self.variant(functools.partial(tx.update, old_classes=old, new_classes=new,
                                            gamma=0.5))
    for kd_updates in (None, kd):
      out, state = update(grads, tx.init(grads), kd_updates=kd_updates)
      chex.assert_tree_all_finite((out, state))
      # The factors are products and quotients of exact small numbers: exact in float32.
      np.testing.assert_array_equal(state.class_scale, expected_scale)
      np.testing.assert_array_equal(out["bias"][1], -expected_scale[1])
    self.assertEqual(float(state.kd_scale), expected_beta)  # exact: √(0² + 5²) of scaled rows
    factors = gr_jax.reweighting_factors(state.cumulative_norms, old, new, 0.5)
    np.testing.assert_array_equal([factors.r_old, factors.r_new], [expected_r, expected_r])


class NormRangeTest(chex.TestCase, parameterized.TestCase):
  """Row norms and β are right for gradients whose float32 squares under- or overflow."""

  @parameterized.product(magnitude=[1e-20, 1e-30, 1e20, 1e30],
                         dtype=[jnp.float32, jnp.bfloat16])
  def test_alpha_and_beta_at_extreme_magnitudes(self, magnitude, dtype):
    # Two classes whose gradient rows have norms in ratio 1:2 (one row each, D = 1).
    w = jnp.asarray([[magnitude, 2 * magnitude]], dtype)
    grads = {"kernel": w, "bias": jnp.zeros(2, dtype)}
    tx = gr_jax.gradient_reweighting()
    _, state = jax.jit(tx.update)(grads, tx.init(grads))
    norms = np.abs(np.asarray(w[0], np.float64))
    # A row of one value has norm |value| up to the rounding of value/value·value: exact.
    np.testing.assert_array_equal(state.cumulative_norms, norms.astype(np.float32))
    np.testing.assert_array_equal(state.class_scale, [1.0, 0.5])  # 2x is exact in binary

    # DGR, old class 0 with KD row [m, 0]: s = [1, 1] (q = 2), β = ‖(m, 2m)‖ / m = √5.
    kd = {"kernel": w * jnp.asarray([[1, 0]], dtype), "bias": jnp.zeros(2, dtype)}
    out, state = jax.jit(tx.update)(grads, tx.init(grads), old_classes=np.array([True, False]),
                                    kd_updates=kd)
    chex.assert_tree_all_finite(out)
    # β: a division, two squares, a sum, a sqrt and two products: a few float32 roundings.
    np.testing.assert_allclose(state.kd_scale, np.sqrt(5.0), rtol=8 * 2.0**-24)
    np.testing.assert_array_equal(state.cumulative_kd_norms, [norms[0].astype(np.float32), 0.0])

  def test_one_norm_across_several_weight_leaves(self):
    """Each class's norm is taken over all weight leaves together, whatever their scales."""
    grads = {"a": {"kernel": jnp.asarray([[1e20, 0.0]])},
             "b": {"kernel": jnp.asarray([[1e-20, 2e20]]), "bias": jnp.zeros(2)}}
    tx = gr_jax.gradient_reweighting()
    _, state = tx.update(grads, tx.init(grads))
    # Class 0: √(1e40 + 1e-40) = 1e20 in float32; class 1: 2e20. Exact as above.
    np.testing.assert_array_equal(state.cumulative_norms, np.float32([1e20, 2e20]))
    np.testing.assert_array_equal(state.class_scale, [1.0, 0.5])


class DiagnosticsTest(chex.TestCase):
  """What per-class diagnostics read from the state: Σh and the factors of the last step."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_last_factors_and_kd_norms_come_back_from_the_state(self):
    old = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0], bool)
    new = np.array([0, 0, 0, 0, 1, 1, 1, 0, 0], bool)
    gamma = float(np.exp(-0.8))
    tx = gr_jax.gradient_reweighting(select_classifier)
    update = self.variant(functools.partial(tx.update, old_classes=old, new_classes=new,
                                            gamma=gamma))
    params, _, _ = dgr_inputs(30, num_classes=9)
    state = tx.init(params)
    kd_norm_sum = np.zeros(9)
    for step in range(4):
      _, grads, kd = dgr_inputs(30 + 2 * step, num_classes=9, scale=np.geomspace(0.01, 10, 9))
      _, state = update(grads, state, kd_updates=kd)
      kd_norm_sum += np.where(old, np.linalg.norm(np.asarray(kd["classifier"]["kernel"],
                                                             np.float64), axis=0), 0.0)
      factors = gr_jax.reweighting_factors(state.cumulative_norms, old, new, gamma)
      # The same function on the same Φ: the same bits, jitted update or not.
      np.testing.assert_array_equal(factors.class_scale, state.class_scale)
    np.testing.assert_array_equal(factors.alpha * np.where(old, factors.r_old, factors.r_new),
                                  factors.class_scale)
    # Σ of 4 float32 norms of 6 values: ~10 roundings of 2^-24 each per norm, 4 sums.
    np.testing.assert_allclose(state.cumulative_kd_norms, kd_norm_sum, rtol=16 * 2.0**-24)
    # A step without kd_updates adds nothing.
    _, grads, _ = dgr_inputs(50, num_classes=9)
    _, after = update(grads, state)
    np.testing.assert_array_equal(after.cumulative_kd_norms, state.cumulative_kd_norms)
    np.testing.assert_array_equal(tx.init(params).cumulative_kd_norms, np.zeros(9))


class SelectorTest(chex.TestCase, parameterized.TestCase):
  """``classifier=`` takes what optax.masked takes as a mask, whatever the dict container type."""

  @parameterized.named_parameters(
      ("subtree_bool", {"params": {"backbone": False, "head": True}}),
      ("mixed_depths", {"params": {"backbone": {"conv": False, "bn": {"scale": False}},
                                   "head": True}}),
      ("callable_prefix", lambda p: {"params": {"backbone": False, "head": True}}),
      ("callable_by_name", lambda p: {"params": {k: k == "head" for k in p["params"]}}),
  )
  def test_prefix_mask_equals_full_mask(self, mask):
    params, grads, kd = flax_params_and_grads()
    expected = two_dgr_steps(gr_jax.gradient_reweighting(FULL_HEAD_MASK), params, grads, kd)
    got = two_dgr_steps(gr_jax.gradient_reweighting(mask), params, grads, kd)
    chex.assert_trees_all_equal(got, expected)
    # The head was reweighted (not passed through) and the backbone passed through.
    head_out, head_in = got[0]["params"]["head"], grads["params"]["head"]
    self.assertFalse(np.allclose(head_out["kernel"], head_in["kernel"]))
    chex.assert_trees_all_equal(got[0]["params"]["backbone"], grads["params"]["backbone"])

  def test_prefix_mask_agrees_with_optax_masked(self):
    params, grads, kd = flax_params_and_grads()
    prefix = {"params": {"backbone": False, "head": True}}
    masked = optax.masked(gr_jax.gradient_reweighting(), prefix, mask_compatible_extra_args=True)
    chex.assert_trees_all_close(
        two_dgr_steps(masked, params, grads, kd)[0],
        two_dgr_steps(gr_jax.gradient_reweighting(prefix), params, grads, kd)[0], rtol=1e-6)

  @parameterized.named_parameters(
      ("dict_full_mask", FULL_HEAD_MASK),
      ("dict_prefix_mask", {"params": {"backbone": False, "head": True}}),
      ("frozen_prefix_mask", FrozenDict({"params": {"backbone": False, "head": True}})),
      ("callable_on_frozen", lambda p: {"params": {"backbone": False, "head": True}}),
  )
  def test_frozen_dict_params_take_dict_masks(self, mask):
    params, grads, kd = flax_params_and_grads()
    expected = two_dgr_steps(gr_jax.gradient_reweighting(FULL_HEAD_MASK), params, grads, kd)
    got = two_dgr_steps(gr_jax.gradient_reweighting(mask), FrozenDict(params), FrozenDict(grads),
                        FrozenDict(kd))
    self.assertIsInstance(got[0], FrozenDict)  # the container type of the updates is kept
    chex.assert_trees_all_equal(jax.tree.leaves(got), jax.tree.leaves(expected))

  def test_frozen_mask_over_dict_params(self):
    params, grads, kd = flax_params_and_grads()
    expected = two_dgr_steps(gr_jax.gradient_reweighting(FULL_HEAD_MASK), params, grads, kd)
    got = two_dgr_steps(gr_jax.gradient_reweighting(FrozenDict(FULL_HEAD_MASK)), params, grads, kd)
    chex.assert_trees_all_equal(got, expected)

  def test_mask_not_matching_params_is_a_clear_error(self):
    params, _, _ = flax_params_and_grads()
    missing = gr_jax.gradient_reweighting({"params": {"backbone": False, "heads": True}})
    with self.assertRaisesRegex(ValueError, r"no entry for params\['params'\]\['head'\]"):
      missing.init(params)
    too_deep = gr_jax.gradient_reweighting(
        {"params": {"backbone": False, "head": {"kernel": {"w": True}, "bias": True}}})
    with self.assertRaisesRegex(ValueError, r"deeper than the params at params\['params'\]"):
      too_deep.init(params)


class CompositionTest(chex.TestCase, parameterized.TestCase):

  def test_inject_hyperparams_with_static_classifier_matches_plain(self):
    params, grads, kd = flax_params_and_grads()
    select = lambda p: {"params": {"backbone": False, "head": True}}
    plain = two_dgr_steps(gr_jax.gradient_reweighting(select), params, grads, kd)
    injected_tx = optax.inject_hyperparams(gr_jax.gradient_reweighting,
                                           static_args=("classifier",))(classifier=select)
    out, state = two_dgr_steps(injected_tx, params, grads, kd)
    chex.assert_trees_all_equal(out, plain[0])
    chex.assert_trees_all_equal(state.inner_state, plain[1])

  @parameterized.named_parameters(
      # optax calls a function with the step count (a 0-d array) as if it were a schedule; mapped
      # over that, a selector gives one bool: False selects nothing, True every leaf.
      ("function_giving_false", lambda p: jax.tree.map(lambda x: x.ndim == 2, p)),
      ("function_giving_true", lambda p: jax.tree_util.tree_map_with_path(
          lambda path, _: "backbone" not in jax.tree_util.keystr(path), p)),
      # An array is taken for a numeric hyperparameter and comes back as a jax array.
      ("array_mask", np.asarray(True)),
  )
  def test_inject_hyperparams_without_static_args_names_the_fix(self, classifier):
    params, _, _ = flax_params_and_grads()
    with self.assertRaisesRegex(ValueError, r"static_args=\('classifier',\)"):
      optax.inject_hyperparams(gr_jax.gradient_reweighting)(classifier=classifier).init(params)

  def test_single_bool_classifier_names_none(self):
    with self.assertRaisesRegex(ValueError, "classifier=True, a single value.*classifier=None"):
      gr_jax.gradient_reweighting(True)

  def test_inject_hyperparams_takes_a_mask_without_static_args(self):
    """A mask (not callable, not numeric) reaches the transform unchanged: no static_args needed."""
    params, grads, kd = flax_params_and_grads()
    mask = {"params": {"backbone": False, "head": True}}
    plain = two_dgr_steps(gr_jax.gradient_reweighting(mask), params, grads, kd)
    out, state = two_dgr_steps(
        optax.inject_hyperparams(gr_jax.gradient_reweighting)(classifier=mask), params, grads, kd)
    chex.assert_trees_all_equal((out, state.inner_state), plain)

  def test_masked_without_compatible_extra_args_names_the_flag(self):
    params, grads, kd = flax_params_and_grads()
    old = np.array([1, 1, 1, 0, 0, 0], bool)
    tx = optax.masked(gr_jax.gradient_reweighting(), {"params": {"backbone": False, "head": True}})
    with self.assertRaisesRegex(ValueError, "mask_compatible_extra_args=True"):
      tx.update(grads, tx.init(params), old_classes=old, kd_updates=kd)

  def test_kd_updates_of_another_structure_is_a_clear_error(self):
    params, grads, kd = flax_params_and_grads()
    old = np.array([1, 1, 1, 0, 0, 0], bool)
    tx = gr_jax.gradient_reweighting({"params": {"backbone": False, "head": True}})
    with self.assertRaisesRegex(ValueError, "kd_updates must have the structure of updates"):
      tx.update(grads, tx.init(params), old_classes=old, kd_updates=kd["params"])


class BalancingTest(parameterized.TestCase):

  @parameterized.parameters(0, 1)
  def test_gr_balances_classifier_norms_on_imbalanced_problem(self, seed):
    """Softmax regression on a 100:1 imbalanced problem with equally hard classes.

    Plain SGD grows the head classes' weight rows faster; GR keeps the per-class row norms close:
    their coefficient of variation drops to well below that of SGD.
    """
    rng = np.random.default_rng(seed)
    counts = np.array([1000, 300, 100, 30, 10])
    num_classes, dim = len(counts), 16
    means = 2.0 * np.eye(num_classes, dim)
    x = np.concatenate([means[c] + rng.normal(size=(n, dim)) for c, n in enumerate(counts)])
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y)
    params = {"kernel": jnp.zeros((dim, num_classes)), "bias": jnp.zeros((num_classes,))}

    def loss_fn(p, xb, yb):
      logits = xb @ p["kernel"] + p["bias"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def norm_variation(tx):
      def step(carry, key):
        p, s = carry
        idx = jax.random.choice(key, x.shape[0], (64,))
        grads = jax.grad(loss_fn)(p, x[idx], y[idx])
        updates, s = tx.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), None

      keys = jax.random.split(jax.random.key(seed), 100)
      (p, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, keys))((params, tx.init(params)))
      norms = np.linalg.norm(np.asarray(p["kernel"]), axis=0)
      return norms.std() / norms.mean()

    sgd = optax.sgd(0.05, momentum=0.9)
    variation_sgd = norm_variation(sgd)
    variation_gr = norm_variation(optax.chain(gr_jax.gradient_reweighting(), sgd))
    self.assertGreater(variation_sgd, 0.2)
    self.assertLess(variation_gr, 0.6 * variation_sgd)


if __name__ == "__main__":
  absltest.main()
