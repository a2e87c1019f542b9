"""The smallest real run of the protocol, shared by the trainer and multi-device tests."""

from configs import cifar100_lt


def tiny_config(npz, **overrides):
  """Three phases (4 + 2 × 3 classes of CIFAR-100-LT), ResNet-8, 2 epochs, a few images a class."""
  c = cifar100_lt.get_config("smoke")
  c.data.source = "npz"
  c.data.path = str(npz)
  c.model = "resnet8"
  c.protocol.num_classes = 10
  c.protocol.nc_first_task = 4
  c.protocol.num_tasks = 3
  c.protocol.max_train_per_class = 12
  c.protocol.max_test_per_class = 6
  c.optim.batch_size = 16
  c.optim.epochs = 2
  c.optim.milestones = (1,)
  c.memory.per_class = 5
  c.eval_chunk = 16
  c.checkpoint.every_epochs = 1
  for key, value in overrides.items():
    target = c
    *path, last = key.split(".")
    for p in path:
      target = target[p]
    target[last] = value
  return c
