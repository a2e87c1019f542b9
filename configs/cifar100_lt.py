"""CIFAR-100-LT (ρ = 0.01, 10,847 images), ResNet-32, 160 epochs per phase (docs/method.md §5–§6).

Presets (comma-separated after the file name):
  scenario: shuffled (default) | ordered | conventional (balanced CIFAR-100)
  split:    lfs20 (20 × 5, default) | lfh50_10x5 (50 + 10 × 5) | lfh50_5x10 (50 + 5 × 10)
  method:   dgr (default) | no_dgr | no_dakd | no_prior | finetune
  smoke:    1 epoch on a small slice of every class, every phase (CPU-friendly)
Example: ``python launch/run.py --config=configs/cifar100_lt.py:lfh50_10x5,finetune``.
The default source is tfds ``cifar100``; an offline copy:
``--config.data.source=npz --config.data.path=../shared/data/cifar100.npz``.
"""

from gr_jax import config as config_lib

SCENARIOS = dict(config_lib.SCENARIOS,
                 lfs20=config_lib.split(5, 20),
                 lfh50_10x5=config_lib.split(50, 11),  # 50 base classes then 10 phases of 5
                 lfh50_5x10=config_lib.split(50, 6))   # 50 base classes then 5 phases of 10


def get_config(arg: str | None = None):
  c = config_lib.base_config()
  c.data.source = "tfds"
  c.data.name = "cifar100"
  c.data.image_size = 32
  c.model = "resnet32"
  c.augment = "cifar"
  c.protocol.nc_first_task = 5
  c.protocol.num_tasks = 20
  config_lib.apply_presets(c, arg, SCENARIOS)
  return c
