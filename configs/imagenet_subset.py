"""ImageNetSubset-LT (100 classes), ResNet-18 at 224, 90 epochs per phase.

Bring the reference repository's list files (``train.txt``/``test.txt`` of ``path label`` lines):
``--config.data.path=/data/imagenet_subset_lists --config.data.data_dir=/data/imagenet``, or an
ImageFolder copy with ``--config.data.source=folder --config.data.path=...``.
Presets: lfs10 (10 × 10, default), lfh50_10x5, lfh50_5x10, method names, ordered/shuffled, smoke.
"""

from configs import common


def _split(first: int, tasks: int):
  def apply(c):
    c.protocol.nc_first_task = first
    c.protocol.num_tasks = tasks
  return apply


def _scenario(name: str):
  def apply(c):
    c.protocol.scenario = name
  return apply


SCENARIOS = {"shuffled": _scenario("shuffled"), "ordered": _scenario("ordered"),
             "conventional": _scenario("conventional"), "lfs10": _split(10, 10),
             "lfh50_10x5": _split(50, 11), "lfh50_5x10": _split(50, 6)}


def get_config(arg: str | None = None):
  c = common.base_config()
  c.data.source = "list"
  c.data.name = "imagenet_subset"
  c.data.image_size = 224
  c.model = "resnet18"
  c.augment = "imagenet"
  c.protocol.nc_first_task = 10
  c.protocol.num_tasks = 10
  c.optim.epochs = 90
  c.optim.milestones = (30, 60)
  c.optim.weight_decay = 1e-4
  c.checkpoint.every_epochs = 5
  common.apply_presets(c, arg, SCENARIOS)
  if arg and "smoke" in arg.split(","):
    c.data.image_size = 32  # ResNet-18 on 32 px images: the whole pipeline at CPU cost
  return c
