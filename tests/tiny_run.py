"""The smallest run of the protocol, shared by the trainer, protocol and multi-device tests.

``write_synthetic_npz`` makes a dataset in the npz layout the trainer reads: a few classes of
random 32×32 images (each class tinted its own colour, so a model can learn something), so that the
trainer is tested end to end on a clone without the real data beside it.
"""

import numpy as np

from configs import cifar100_lt

SYNTHETIC_CLASSES = 10


def write_synthetic_npz(path, train_per_class: int = 40, test_per_class: int = 8, seed: int = 0):
  """Writes ``path`` (x_train, y_train, x_test, y_test) with ``SYNTHETIC_CLASSES`` classes."""
  rng = np.random.default_rng(seed)
  tint = rng.integers(0, 256, (SYNTHETIC_CLASSES, 1, 1, 3))

  def split(per_class):
    y = np.repeat(np.arange(SYNTHETIC_CLASSES), per_class)
    noise = rng.integers(-60, 61, (len(y), 32, 32, 3))
    return np.clip(tint[y] + noise, 0, 255).astype(np.uint8), y.astype(np.int64)

  x_train, y_train = split(train_per_class)
  x_test, y_test = split(test_per_class)
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  return path


def tiny_config(npz, **overrides):
  """Three phases (4 + 2 × 3 classes, long-tailed), ResNet-8, 2 epochs, a few images a class.

  ``npz`` is the synthetic dataset of :func:`write_synthetic_npz` or the real CIFAR-100 copy (its
  first 10 classes of the CIFAR-100-LT order).
  """
  c = cifar100_lt.get_config("smoke")
  c.data.source = "npz"
  c.data.path = str(npz)
  c.data.name = None
  c.model = "resnet8"
  c.protocol.rho = 0.1  # long-tailed on the synthetic set too (its largest class has 40 images)
  c.protocol.num_classes = 10
  c.protocol.nc_first_task = 4
  c.protocol.num_tasks = 3
  c.protocol.max_train_per_class = 12
  c.protocol.max_test_per_class = 6
  c.optim.batch_size = 16
  c.optim.epochs = 2
  c.optim.milestones = (1,)
  c.memory.per_class = 7  # more than the long tail's smallest class holds: kept whole
  c.eval_chunk = 16
  c.epochs_per_call = 1
  c.checkpoint.every_seconds = 0  # a checkpoint after every call (every epoch)
  for key, value in overrides.items():
    target = c
    *path, last = key.split(".")
    for p in path:
      target = target[p]
    target[last] = value
  return c
