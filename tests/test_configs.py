"""Config files: presets, the paper's settings, and unknown presets."""

import pytest

from configs import cifar100_lt
from gr_jax import trainer
from configs import food101
from configs import imagenet_subset


def test_cifar_presets_give_the_paper_settings():
  c = cifar100_lt.get_config()
  assert (c.model, c.optim.epochs, tuple(c.optim.milestones), c.optim.weight_decay) == (
      "resnet32", 160, (80, 120), 5e-4)
  assert (c.protocol.nc_first_task, c.protocol.num_tasks, c.memory.per_class) == (5, 20, 20)
  c = cifar100_lt.get_config("lfh50_10x5,ordered,finetune")
  assert (c.protocol.nc_first_task, c.protocol.num_tasks, c.protocol.scenario) == (50, 11, "ordered")
  assert (c.method.reweighting, c.method.kd, c.method.logit_prior) == ("none", "plain", False)


def test_imagenet_style_configs():
  c = food101.get_config()
  assert (c.model, c.data.image_size, c.optim.epochs, tuple(c.optim.milestones)) == (
      "resnet18", 224, 90, (30, 60))
  assert (c.protocol.nc_first_task, c.protocol.num_tasks, c.optim.weight_decay) == (51, 6, 1e-4)
  smoke = imagenet_subset.get_config("smoke")
  assert (smoke.data.image_size, smoke.optim.epochs, smoke.protocol.max_train_per_class) == (
      32, 1, 10)


def test_unknown_preset_is_refused_with_the_known_ones():
  with pytest.raises(ValueError, match="unknown config preset 'lfs21'.*lfs20"):
    cifar100_lt.get_config("lfs21")


@pytest.mark.parametrize("key,value", [("every_epochs", 0), ("keep", 0), ("keep", -1)])
def test_checkpoint_settings_that_would_crash_or_stop_resuming_are_refused(key, value):
  c = cifar100_lt.get_config("smoke")
  c.checkpoint[key] = value
  with pytest.raises(ValueError, match=rf"config.checkpoint.{key}={value!r}: must be an integer >= 1"):
    trainer.validate_config(c)


def test_bad_seeds_name_the_setting():
  c = cifar100_lt.get_config("smoke")
  c.seeds = "a,b"
  with pytest.raises(ValueError, match=r"config.seeds='a,b': give comma-separated integers"):
    trainer.parse_seeds(c)
