"""ImageNetSubset-LT (100 classes), ResNet-18 at 224, 90 epochs per phase.

Bring the reference repository's list files (``train.txt``/``test.txt`` of ``path label`` lines):
``--config.data.path=/data/imagenet_subset_lists --config.data.data_dir=/data/imagenet``, or an
ImageFolder copy with ``--config.data.source=folder --config.data.path=...``.
Presets: lfs10 (10 × 10, default), lfh50_10x5, lfh50_5x10, method names, ordered/shuffled, smoke.
"""

from gr_jax import config as config_lib

SCENARIOS = dict(config_lib.SCENARIOS,
                 lfs10=config_lib.split(10, 10),
                 lfh50_10x5=config_lib.split(50, 11),
                 lfh50_5x10=config_lib.split(50, 6))


def get_config(arg: str | None = None):
  c = config_lib.base_config()
  c.data.source = "list"
  c.data.name = "imagenet_subset"
  c.protocol.nc_first_task = 10
  c.protocol.num_tasks = 10
  config_lib.imagenet_style(c)
  config_lib.apply_presets(c, arg, SCENARIOS)
  return c
