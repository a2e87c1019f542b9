"""Config files: presets, the paper's settings, and unknown presets."""

import pytest

from configs import cifar100_lt
from gr_jax import config as config_lib
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


@pytest.mark.parametrize("key,value,says", [
    ("checkpoint.keep", 0, "must be an integer >= 1"), ("checkpoint.keep", -1, "must be an integer"),
    ("checkpoint.every_seconds", -1.0, "must be a number >= 0"),
    ("epochs_per_call", 0, "must be an integer >= 1")])
def test_checkpoint_settings_that_would_crash_or_stop_resuming_are_refused(key, value, says):
  c = cifar100_lt.get_config("smoke")
  *path, last = key.split(".")
  (c[path[0]] if path else c)[last] = value
  with pytest.raises(ValueError, match=rf"config.{key}={value!r}: {says}"):
    config_lib.validate(c)


@pytest.mark.parametrize("key,value,says", [
    ("milestones", (5, 2), "give increasing epoch numbers"),
    ("milestones", ("abc",), "give increasing epoch numbers"),  # what --config.optim.milestones=abc gives
    ("milestones", (0, 80), "give increasing epoch numbers"),
    ("learning_rate", -1.0, "must be a finite number > 0"),
    ("momentum", 1.0, r"must be a finite number in \[0, 1\)"),
    ("weight_decay", -5e-4, "must be a finite number >= 0"),
    ("epochs", 0, "must be an integer >= 1"),
    ("batch_size", 2.5, "must be an integer >= 1"),
    ("clip_norm", -1.0, r"must be a finite number > 0, or None for no clipping"),
    ("clip_norm", 0.0, r"must be a finite number > 0, or None for no clipping"),
])
def test_bad_optimiser_settings_are_refused_before_anything_is_written(key, value, says):
  c = cifar100_lt.get_config()
  with c.unlocked():
    del c.optim[key]  # let the test set values of another type, as the flag parser may
    c.optim[key] = value
  with pytest.raises(ValueError, match=rf"config.optim.{key}=.*{says}"):
    config_lib.validate(c)


def test_clip_norm_none_turns_clipping_off_and_is_accepted():
  c = cifar100_lt.get_config()
  c.optim.clip_norm = None
  config_lib.validate(c)


def test_milestones_past_the_last_epoch_only_warn(caplog):
  c = cifar100_lt.get_config()
  c.optim.epochs = 3  # a short run that keeps the paper's milestones
  with caplog.at_level("WARNING"):
    config_lib.validate(c)
  assert "milestones [80, 120] reach no epoch of a 3-epoch phase" in caplog.text


def test_bad_seeds_name_the_setting():
  c = cifar100_lt.get_config("smoke")
  c.seeds = "a,b"
  with pytest.raises(ValueError, match=r"config.seeds='a,b': give comma-separated integers"):
    config_lib.validate(c)


def test_a_workdir_that_is_a_file_is_refused_before_the_data_is_read(tmp_path):
  not_a_dir = tmp_path / "notes.txt"
  not_a_dir.write_text("kept")
  c = cifar100_lt.get_config("smoke")
  c.data.source, c.data.path = "npz", str(tmp_path / "absent.npz")  # never read
  with pytest.raises(ValueError, match="is a file, not a directory"):
    trainer.run(c, str(not_a_dir))
  assert not_a_dir.read_text() == "kept"


@pytest.mark.parametrize("key,value,says", [
    ("method.reweighting", "dgrr", r"config.method.reweighting='dgrr': use dgr \| gr \| none"),
    ("method.kd", "kd", r"config.method.kd='kd': use dakd \| plain \| none"),
    ("dtype", "float16", r"config.dtype='float16': use float32 \| bfloat16"),
    ("seeds", "1,1", r"config.seeds='1,1': give distinct"),
    ("num_devices", 0, r"config.num_devices=0: use None"),
])
def test_each_setting_is_refused_in_one_place_naming_it(key, value, says):
  c = cifar100_lt.get_config("smoke")
  *path, last = key.split(".")
  target = c
  for part in path:
    target = target[part]
  target[last] = value
  with pytest.raises(ValueError, match=says):
    config_lib.validate(c)


def test_seeds_and_their_single_seed_configs():
  c = cifar100_lt.get_config("smoke")
  assert config_lib.seeds(c) == (0,)
  c.seeds = "3,1"
  assert config_lib.seeds(c) == (3, 1)
  one = config_lib.for_seed(c, 1)
  assert (one.seed, one.seeds, c.seeds) == (1, None, "3,1")
  # One seed of a multi-seed run is the single-seed run of that seed: same checkpoint key.
  single = cifar100_lt.get_config("smoke")
  single.seed = 1
  assert config_lib.fingerprint(one.to_dict(), "d") == config_lib.fingerprint(single.to_dict(), "d")
