"""Food-101-LT, ResNet-18 at 224, LFH 51 + 5 × 10, 90 epochs per phase (docs/method.md §5–§6).

Default source: tfds ``food101``. The 101-class Tiny-ImageNet proxy (real JPEGs):
``--config.data.source=folder --config.data.path=../shared/data/tiny-imagenet-101``.
Presets: method names (dgr, no_dgr, no_dakd, no_prior, finetune), ordered/shuffled/conventional,
smoke.
"""

from gr_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.base_config()
  c.data.source = "tfds"
  c.data.name = "food101"
  c.protocol.nc_first_task = 51
  c.protocol.num_tasks = 6
  config_lib.imagenet_style(c)
  config_lib.apply_presets(c, arg, config_lib.SCENARIOS)
  return c
