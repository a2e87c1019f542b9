"""Tests for gr_jax.models: shapes, parameter count, masked BatchNorm, eval mode, dtypes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gr_jax import models

# ResNet-32 (FACIL/PODNet layout, bias-free convs) with a 100-way head, counted by hand:
#   stem     conv 3·3·3·16 = 432,                          BN 2·16 = 32            ->     464
#   stage 1  5 × (2 · 9·16·16 + 2 · 2·16) = 5 × 4,672                               ->  23,360
#   stage 2  first: 9·16·32 + 9·32·32 + 2·64 + 1×1 shortcut 16·32 + BN 64 = 14,528
#            4 × (2 · 9·32·32 + 2 · 64) = 4 × 18,560 = 74,240                       ->  88,768
#   stage 3  first: 9·32·64 + 9·64·64 + 2·128 + 1×1 shortcut 32·64 + BN 128 = 57,728
#            4 × (2 · 9·64·64 + 2 · 128) = 4 × 73,984 = 295,936                     -> 353,664
#   head     64·100 + 100                                                           ->   6,500
#   total    464 + 23,360 + 88,768 + 353,664 + 6,500 = 472,756 (BN running stats excluded)
RESNET32_C100_PARAMS = 472_756


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.fixture(scope='module')
def resnet32():
  # One real init shared by the tests (eager init dominates their runtime); parameter shapes do
  # not depend on the spatial size, so a tiny 8×8 input suffices.
  model = models.create_model('resnet32', 100)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
  return model, variables


def test_resnet32_shapes_and_param_layout(resnet32):
  model, variables = resnet32
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  params = variables['params']
  assert set(params) == {'backbone', 'classifier'}
  assert set(variables['batch_stats']) == {'backbone'}
  assert params['classifier']['kernel'].shape == (64, 100)
  assert params['classifier']['bias'].shape == (100,)
  assert _count(params) == RESNET32_C100_PARAMS
  assert _count(params['backbone']) == RESNET32_C100_PARAMS - 6_500
  feats, logits = model.apply(variables, x, train=False)
  assert feats.shape == (2, 64) and logits.shape == (2, 100)
  assert feats.dtype == jnp.float32 and logits.dtype == jnp.float32
  assert bool(jnp.all(feats >= 0))  # post-ReLU average pool


def test_resnet32_init_matches_torch_conventions(resnet32):
  params = resnet32[1]['params']
  block = params['backbone']['layer3_1']
  # kaiming_normal_(mode='fan_out', relu): std = sqrt(2 / (3·3·64)).
  np.testing.assert_allclose(np.std(block['conv2']['kernel']), np.sqrt(2 / 576), rtol=0.03)
  np.testing.assert_array_equal(block['bn1']['scale'], np.ones(64))
  np.testing.assert_array_equal(block['bn1']['bias'], np.zeros(64))
  # torch nn.Linear: U(-1/sqrt(64), 1/sqrt(64)) for weight and bias.
  head = params['classifier']
  assert float(jnp.max(jnp.abs(head['kernel']))) <= 1 / 8
  assert float(jnp.max(jnp.abs(head['bias']))) <= 1 / 8
  assert float(jnp.max(jnp.abs(head['kernel']))) > 0.1


def test_resnet18_shapes_and_param_count():
  model = models.create_model('resnet18', 10)
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  # Shapes via abstract init (a real eager init of 11M params is slow on CPU), then a real
  # forward pass with small constant weights.
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  params = shapes['params']
  assert set(params) == {'backbone', 'classifier'}
  assert params['classifier']['kernel'].shape == (512, 10)
  # torchvision resnet18 has 11,689,512 params with its 1000-way fc (512·1000 + 1000).
  assert _count(params['backbone']) == 11_689_512 - 513_000
  variables = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), shapes)
  feats, logits = model.apply(variables, x, train=False)
  assert feats.shape == (2, 512) and logits.shape == (2, 10)


def test_masked_batchnorm_ignores_padded_rows(resnet32):
  model, variables = resnet32
  valid = jax.random.normal(jax.random.key(2), (3, 8, 8, 3))
  garbage = 1e3 * jax.random.normal(jax.random.key(3), (2, 8, 8, 3)) + 50.0
  padded = jnp.concatenate([valid, garbage])
  mask = jnp.array([True, True, True, False, False])

  (f_ref, l_ref), upd_ref = model.apply(variables, valid, train=True, mutable=['batch_stats'])
  (f_pad, l_pad), upd_pad = model.apply(
      variables, padded, train=True, mask=mask, mutable=['batch_stats'])
  np.testing.assert_allclose(f_pad[:3], f_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(l_pad[:3], l_ref, rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               upd_pad['batch_stats'], upd_ref['batch_stats'])
  # The running averages did move (momentum 0.9): mean = 0.1 · batch mean of the stem BN input.
  stem_mean = upd_ref['batch_stats']['backbone']['bn1']['mean']
  assert float(jnp.max(jnp.abs(stem_mean))) > 1e-3
  # Without the mask the garbage rows would dominate the statistics.
  (_, _), upd_nomask = model.apply(variables, padded, train=True, mutable=['batch_stats'])
  diff = jnp.abs(upd_nomask['batch_stats']['backbone']['bn1']['var'] -
                 upd_ref['batch_stats']['backbone']['bn1']['var'])
  assert float(jnp.max(diff)) > 1.0


def test_eval_mode_uses_running_stats(resnet32):
  model, variables = resnet32
  # Non-trivial running stats so the check is not about the identity initial ones.
  warm = 3.0 * jax.random.normal(jax.random.key(4), (4, 8, 8, 3)) + 1.0
  _, upd = model.apply(variables, warm, train=True, mutable=['batch_stats'])
  variables = {'params': variables['params'], 'batch_stats': upd['batch_stats']}

  a = jax.random.normal(jax.random.key(5), (1, 8, 8, 3))
  others = jax.random.normal(jax.random.key(6), (3, 8, 8, 3)) * 10.0
  f_alone, l_alone = model.apply(variables, a, train=False)
  f_batch, l_batch = model.apply(variables, jnp.concatenate([a, others]), train=False)
  np.testing.assert_allclose(f_batch[:1], f_alone, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(l_batch[:1], l_alone, rtol=1e-5, atol=1e-5)
  # In train mode the same row depends on its batch-mates.
  (_, l_train), _ = model.apply(variables, jnp.concatenate([a, others]), train=True,
                                mutable=['batch_stats'])
  assert float(jnp.max(jnp.abs(l_train[:1] - l_alone))) > 1e-3


def test_features_and_head_apply_separately(resnet32):
  model, variables = resnet32
  x = jax.random.normal(jax.random.key(7), (2, 8, 8, 3))
  feats, logits = model.apply(variables, x, train=False)
  feats_only = model.apply(variables, x, train=False, method='features')
  head_params = {'classifier': variables['params']['classifier']}
  logits_only = model.apply({'params': head_params}, feats, method='head')
  np.testing.assert_allclose(feats_only, feats, rtol=1e-6)
  np.testing.assert_allclose(logits_only, logits, rtol=1e-6)

  # Gradient through the head alone: d(sum logits)/d(bias) = batch size for every class.
  grads = jax.grad(lambda p: model.apply({'params': p}, feats, method='head').sum())(head_params)
  np.testing.assert_allclose(grads['classifier']['bias'], np.full(100, 2.0))
  np.testing.assert_allclose(grads['classifier']['kernel'],
                             np.repeat(np.asarray(feats).sum(0)[:, None], 100, axis=1), rtol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits(resnet32):
  _, variables32 = resnet32
  model = models.create_model('resnet32', 100, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(8), (2, 8, 8, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(variables)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  (feats, logits), upd = model.apply(variables32, x, train=True, mutable=['batch_stats'])
  assert feats.dtype == jnp.float32 and logits.dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree.leaves(upd)} == {jnp.dtype(jnp.float32)}
  # Same weights as the float32 model: bf16 logits agree to bf16 precision.
  _, logits32 = models.create_model('resnet32', 100).apply(variables32, x, train=False)
  _, logits16 = model.apply(variables32, x, train=False)
  assert logits16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(logits16 - logits32) / jnp.linalg.norm(logits32))
  assert rel < 0.05


def test_create_model_unknown_name():
  with pytest.raises(ValueError, match='resnet18.*resnet32'):
    models.create_model('vgg16', 10)


def test_two_pass_batchnorm_variance_keeps_precision_where_one_pass_cancels():
  # A channel whose mean (1000) dwarfs its spread (0.01): E[x²] − E[x]² cancels in float32, the
  # two-pass E[(x − E[x])²] (torch's form, bn_fast_variance=False) does not.
  x = 1000.0 + 0.01 * np.random.default_rng(0).normal(size=(16, 4, 4, 3)).astype(np.float32)
  want = x.astype(np.float64).var(axis=(0, 1, 2))
  errors = {}
  for fast in (True, False):
    bn = models._bn(True, jnp.float32, fast, 'bn')
    variables = bn.init(jax.random.key(0), x)
    _, updated = bn.apply(variables, x, mutable=['batch_stats'])
    # Running var after one step from 1: 0.9 · 1 + 0.1 · batch variance.
    got = (np.asarray(updated['batch_stats']['var'], np.float64) - 0.9) / 0.1
    errors[fast] = np.max(np.abs(got - want) / want)
  assert errors[False] < 0.05, errors
  assert errors[True] > 10 * errors[False], errors


@pytest.mark.parametrize('fast', [True, False])
def test_bn_fast_variance_reaches_every_batchnorm(fast):
  model = models.create_model('resnet8', 10, bn_fast_variance=fast)
  x = jnp.zeros((2, 8, 8, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm):
      seen.append(context.module.use_fast_variance)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert len(seen) == 9  # stem + 3 blocks × 2 + 2 shortcut BNs
  assert set(seen) == {fast}
