"""Backbones and classifier head (method.md §5): CIFAR ResNet-32 and torchvision-layout ResNet-18.

Every model is a top-level module with exactly two children, so its variables look like::

  {'params': {'backbone': {...}, 'classifier': {'kernel': [D, C], 'bias': [C]}},
   'batch_stats': {'backbone': {...}}}

which lets a trainer treat (and reweight / differentiate) the classifier on its own. Calling parts:

  * whole model: ``feats, logits = model.apply(variables, x, train=True, mask=m,
    mutable=['batch_stats'])`` (train) or ``model.apply(variables, x, train=False)`` (eval).
  * backbone only: ``model.apply(variables, x, train=False, method='features')`` -> ``[B, D]``.
  * head only: ``model.apply({'params': {'classifier': params['classifier']}}, feats,
    method='head')`` -> ``[B, C]`` float32 logits; needs no backbone variables, so
    ``jax.grad`` over the head alone is cheap.

Images are NHWC. ``dtype`` is the computation dtype (e.g. ``jnp.bfloat16``); parameters and
BatchNorm statistics are always float32, and features / logits are returned as float32.

BatchNorm follows torch defaults (momentum 0.1 == flax momentum 0.9, epsilon 1e-5). One known
difference from torch: the running variance is updated with the biased batch variance (flax) rather
than the unbiased one (torch); the effect is a factor n/(n-1) on tiny batches only.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any

# torchvision / FACIL: kaiming_normal_(mode='fan_out', nonlinearity='relu') on every conv.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# torch nn.Linear default: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')

_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


def _torch_linear_bias_init(fan_in: int):
  """Bias init of torch ``nn.Linear`` (needs the fan-in, which flax bias inits do not receive)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _bn_mask(mask: jax.Array | None) -> jax.Array | None:
  """Turns a per-example bool mask [B] into one that broadcasts against NHWC activations."""
  return None if mask is None else jnp.asarray(mask, bool)[:, None, None, None]


def _bn(train: bool, dtype: Dtype, fast_variance: bool, name: str) -> nn.BatchNorm:
  """BatchNorm with torch defaults; call it as ``_bn(...)(x, mask=_bn_mask(mask))``.

  ``fast_variance``: the batch variance as ``E[x²] − E[x]²`` (one fused reduction pass; statistics
  are accumulated in float32 also under bf16), 9 % more DGR steps/s on an H100 than the two-pass
  ``E[(x − E[x])²]`` of torch (BENCHMARKS.md), but it loses precision where a channel's mean is
  large against its spread (RESULTS.md compares the accuracy of both).

  The mask only enters batch statistics (flax ignores it with running averages), so padded rows
  (mask False) never affect the normalisation of real rows nor the running averages.
  """
  return nn.BatchNorm(
      use_running_average=not train, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, dtype=dtype,
      param_dtype=jnp.float32, use_fast_variance=fast_variance, name=name)


def _conv(features: int, kernel: int, stride: int, padding: int, dtype: Dtype, name: str):
  """Bias-free conv with torch-style symmetric padding (flax 'SAME' pads asymmetrically)."""
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride),
      padding=((padding, padding), (padding, padding)), use_bias=False,
      kernel_init=_conv_init, dtype=dtype, param_dtype=jnp.float32, name=name)


class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU; 1×1 conv + BN shortcut when the shape changes."""
  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  bn_fast_variance: bool = True

  @nn.compact
  def __call__(self, x, train: bool, mask: jax.Array | None):
    m = _bn_mask(mask)
    y = _conv(self.features, 3, self.stride, 1, self.dtype, 'conv1')(x)
    y = nn.relu(_bn(train, self.dtype, self.bn_fast_variance, 'bn1')(y, mask=m))
    y = _conv(self.features, 3, 1, 1, self.dtype, 'conv2')(y)
    y = _bn(train, self.dtype, self.bn_fast_variance, 'bn2')(y, mask=m)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.stride, 0, self.dtype, 'downsample_conv')(x)
      x = _bn(train, self.dtype, self.bn_fast_variance, 'downsample_bn')(x, mask=m)
    return nn.relu(y + x)


class _ResNetBackbone(nn.Module):
  """Generic stem + stages of BasicBlocks + global average pool.

  Attributes:
    stem: 'cifar' (3×3/1 conv) or 'imagenet' (7×7/2 conv + 3×3/2 max-pool).
    stem_width: channels of the stem conv.
    widths: channels per stage; stages after the first start with stride 2.
    blocks: BasicBlocks per stage.
  """
  stem: str
  stem_width: int
  widths: Sequence[int]
  blocks: int
  dtype: Dtype = jnp.float32
  bn_fast_variance: bool = True

  @nn.compact
  def __call__(self, x, train: bool, mask: jax.Array | None = None):
    x = jnp.asarray(x, self.dtype)
    m = _bn_mask(mask)
    if self.stem == 'cifar':
      x = _conv(self.stem_width, 3, 1, 1, self.dtype, 'conv1')(x)
      x = nn.relu(_bn(train, self.dtype, self.bn_fast_variance, 'bn1')(x, mask=m))
    else:
      x = _conv(self.stem_width, 7, 2, 3, self.dtype, 'conv1')(x)
      x = nn.relu(_bn(train, self.dtype, self.bn_fast_variance, 'bn1')(x, mask=m))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, width in enumerate(self.widths):
      for block in range(self.blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        block_module = BasicBlock(width, stride, self.dtype, self.bn_fast_variance,
                                  name=f'layer{stage + 1}_{block}')
        x = block_module(x, train, mask)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


class _Classifier(nn.Module):
  """Top-level model: ``backbone`` -> D-d features, ``classifier`` Dense -> C float32 logits."""
  num_classes: int
  dtype: Dtype = jnp.float32
  bn_fast_variance: bool = True

  def _make_backbone(self) -> nn.Module:
    raise NotImplementedError

  @property
  def feature_dim(self) -> int:
    raise NotImplementedError

  def setup(self):
    self.backbone = self._make_backbone()
    self.classifier = nn.Dense(
        self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=_dense_kernel_init, bias_init=_torch_linear_bias_init(self.feature_dim))

  def features(self, x, train: bool, mask: jax.Array | None = None) -> jax.Array:
    """Backbone only: NHWC images -> float32 features [B, D]."""
    return self.backbone(x, train, mask)

  def head(self, features: jax.Array) -> jax.Array:
    """Classifier only: features [B, D] -> float32 logits [B, C]."""
    return self.classifier(features).astype(jnp.float32)

  def __call__(self, x, train: bool, mask: jax.Array | None = None):
    """Returns ``(features [B, D], logits [B, C])``, both float32.

    Args:
      x: NHWC images.
      train: batch statistics (and running-average updates; pass ``mutable=['batch_stats']``)
        when True, running statistics when False.
      mask: optional bool [B]; False rows are padding and never enter BatchNorm batch
        statistics. At least one row must be True in training mode.
    """
    feats = self.features(x, train, mask)
    return feats, self.head(feats)


class ResNet32(_Classifier):
  """CIFAR ResNet-32 (FACIL/PODNet): 3×3 conv 16, 3 stages × 5 BasicBlocks (16/32/64) -> 64-d."""

  @property
  def feature_dim(self) -> int:
    return 64

  def _make_backbone(self):
    return _ResNetBackbone('cifar', 16, (16, 32, 64), 5, self.dtype, self.bn_fast_variance)


class ResNet18(_Classifier):
  """torchvision ResNet-18: 7×7/2 conv 64, max-pool, 4 stages × 2 BasicBlocks -> 512-d."""

  @property
  def feature_dim(self) -> int:
    return 512

  def _make_backbone(self):
    return _ResNetBackbone('imagenet', 64, (64, 128, 256, 512), 2, self.dtype,
                           self.bn_fast_variance)


class ResNet8(_Classifier):
  """ResNet-32's layout with one block per stage: cheap to compile, for tests and smoke runs."""

  @property
  def feature_dim(self) -> int:
    return 64

  def _make_backbone(self):
    return _ResNetBackbone('cifar', 16, (16, 32, 64), 1, self.dtype, self.bn_fast_variance)


# The classifier of every model here, as ``optax.masked`` / :func:`gr_jax.gradient_reweighting` take
# a mask: a prefix of the params.
classifier_mask = {'backbone': False, 'classifier': True}

_MODELS = {'resnet32': ResNet32, 'resnet18': ResNet18, 'resnet8': ResNet8}


def create_model(name: str, num_classes: int, dtype: Dtype = jnp.float32, *,
                 bn_fast_variance: bool = True) -> nn.Module:
  """Builds a model by name ('resnet32' for CIFAR, 'resnet18' for ImageNet-style data, 'resnet8'
  for tests); ``bn_fast_variance=False`` computes BatchNorm's batch variance in two passes (torch).

  Raises:
    ValueError: for an unknown name; the message lists the valid ones.
  """
  try:
    cls = _MODELS[name.lower()]
  except KeyError:
    raise ValueError(f'unknown model {name!r}; valid names: {sorted(_MODELS)}') from None
  return cls(num_classes=num_classes, dtype=dtype, bn_fast_variance=bn_fast_variance)
