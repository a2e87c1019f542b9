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


@pytest.mark.parametrize("key,value,says", [
    ("milestones", (5, 2), "give increasing epoch numbers"),
    ("milestones", ("abc",), "give increasing epoch numbers"),  # what --config.optim.milestones=abc gives
    ("milestones", (0, 80), "give increasing epoch numbers"),
    ("learning_rate", -1.0, "must be a finite number > 0"),
    ("momentum", 1.0, r"must be a finite number in \[0, 1\)"),
    ("weight_decay", -5e-4, "must be a finite number >= 0"),
    ("epochs", 0, "must be an integer >= 1"),
    ("batch_size", 2.5, "must be an integer >= 1"),
    ("clip_norm", -1.0, r"must be a finite number >= 0 \(0: no clipping\)"),
])
def test_bad_optimiser_settings_are_refused_before_anything_is_written(key, value, says):
  c = cifar100_lt.get_config()
  with c.unlocked():
    del c.optim[key]  # let the test set values of another type, as the flag parser may
    c.optim[key] = value
  with pytest.raises(ValueError, match=rf"config.optim.{key}=.*{says}"):
    trainer.validate_config(c)


def test_clip_norm_zero_turns_clipping_off_and_is_accepted():
  c = cifar100_lt.get_config()
  c.optim.clip_norm = 0.0
  trainer.validate_config(c)


def test_milestones_past_the_last_epoch_only_warn(caplog):
  c = cifar100_lt.get_config()
  c.optim.epochs = 3  # a short run that keeps the paper's milestones
  with caplog.at_level("WARNING"):
    trainer.validate_config(c)
  assert "milestones [80, 120] reach no epoch of a 3-epoch phase" in caplog.text


def test_bad_seeds_name_the_setting():
  c = cifar100_lt.get_config("smoke")
  c.seeds = "a,b"
  with pytest.raises(ValueError, match=r"config.seeds='a,b': give comma-separated integers"):
    trainer.parse_seeds(c)


def test_a_workdir_that_is_a_file_is_refused_before_the_data_is_read(tmp_path):
  not_a_dir = tmp_path / "notes.txt"
  not_a_dir.write_text("kept")
  c = cifar100_lt.get_config("smoke")
  c.data.source, c.data.path = "npz", str(tmp_path / "absent.npz")  # never read
  with pytest.raises(ValueError, match="is a file, not a directory"):
    trainer.run(c, str(not_a_dir))
  assert not_a_dir.read_text() == "kept"
