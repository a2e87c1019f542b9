"""Food-101-LT, ResNet-18 at 224, LFH 51 + 5 × 10, 90 epochs per phase (docs/method.md §5–§6).

Default source: tfds ``food101``. The 101-class Tiny-ImageNet proxy (real JPEGs):
``--config.data.source=folder --config.data.path=../shared/data/tiny-imagenet-101``.
Presets: method names (dgr, no_dgr, no_dakd, no_prior, finetune), ordered/shuffled, smoke.
"""

from configs import common


def _scenario(name: str):
  def apply(c):
    c.protocol.scenario = name
  return apply


SCENARIOS = {"shuffled": _scenario("shuffled"), "ordered": _scenario("ordered"),
             "conventional": _scenario("conventional")}


def get_config(arg: str | None = None):
  c = common.base_config()
  c.data.source = "tfds"
  c.data.name = "food101"
  c.data.image_size = 224
  c.model = "resnet18"
  c.augment = "imagenet"
  c.protocol.nc_first_task = 51
  c.protocol.num_tasks = 6
  c.optim.epochs = 90
  c.optim.milestones = (30, 60)
  c.optim.weight_decay = 1e-4
  c.checkpoint.every_epochs = 5
  common.apply_presets(c, arg, SCENARIOS)
  if arg and "smoke" in arg.split(","):
    c.data.image_size = 32  # ResNet-18 on 32 px images: the whole pipeline at CPU cost
    c.protocol.max_train_per_class = 10
    c.protocol.max_test_per_class = 5
  return c
