"""Defaults shared by every gr_jax config, and the preset syntax ``--config=configs/x.py:a,b``."""

import ml_collections

# Method presets: the paper's method, its ablations and the fine-tuning baseline (docs/method.md).
METHODS = {
    "dgr": dict(reweighting="dgr", kd="dakd", logit_prior=True),
    "no_dgr": dict(reweighting="gr", kd="dakd", logit_prior=True),
    "no_dakd": dict(reweighting="dgr", kd="plain", logit_prior=True),
    "no_prior": dict(reweighting="dgr", kd="dakd", logit_prior=False),
    "finetune": dict(reweighting="none", kd="plain", logit_prior=False),
}


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(dict(
      source="tfds",   # tfds | npz | folder | list
      name="",         # tfds name, e.g. cifar100 / food101
      path="",         # npz file, image folder or folder of train.txt/test.txt
      data_dir="",     # tfds data_dir (or the root of list-file paths)
      image_size=32,   # images are stored and trained at this size
      download=True,   # tfds only: download and prepare if absent
  ))
  c.protocol = ml_collections.ConfigDict(dict(
      scenario="shuffled",   # shuffled | ordered | conventional (balanced)
      profile="exponential",  # exponential | step | none
      rho=0.01,               # imbalance ratio n_min / n_max
      nc_first_task=0,        # classes of phase 0 (0: an even split)
      num_tasks=10,
      val_fraction=0.1,       # per-class hold-out as the reference (only logged, never used)
      order_seed=1993,        # class order for datasets without a fixed one
      lt_seed=0,              # the reference's numpy seed for the LT selection
      num_classes=0,          # >0 keeps only the first classes of the order (smoke runs only)
      max_train_per_class=0,  # >0 caps training images per class (smoke runs only)
      max_test_per_class=0,   # >0 caps test images per class (smoke runs only)
  ))
  c.model = "resnet32"
  c.augment = "cifar"
  c.method = ml_collections.ConfigDict(dict(
      name="dgr", kd_lambda_base=0.7, temperature=2.0, **METHODS["dgr"]))
  c.memory = ml_collections.ConfigDict(dict(per_class=20, selection="herding"))
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=0.1, momentum=0.9, weight_decay=5e-4, epochs=160, milestones=(80, 120),
      lr_decay=0.1, batch_size=128, clip_norm=10000.0))
  c.seed = 0
  c.seeds = ""        # e.g. "0,1,2,3,4": independent seeds trained together in one program
  # How several seeds share the program: "sequential" (a lax.map over seeds: dense per-seed
  # convolutions, the faster on GPU) or "vmap" (batched ops; convolutions become grouped ones).
  c.seed_execution = "sequential"
  c.dtype = "float32"  # float32 | bfloat16 (compute; params, norms and losses stay float32)
  # BatchNorm batch variance as E[x²] − E[x]² (one pass, 9 % faster on an H100) or, if False, the
  # two-pass E[(x − E[x])²] of torch (RESULTS.md, "BatchNorm's variance in one pass or two").
  c.bn_fast_variance = True
  c.num_devices = 0   # 0: all local devices (data parallel)
  c.eval_chunk = 500     # test / herding images per compiled call
  c.epoch_as_scan = "auto"  # one lax.scan per epoch (auto: on GPU/TPU; XLA:CPU loops are slow)
  c.checkpoint = ml_collections.ConfigDict(dict(every_epochs=10, keep=3))
  # Persistent XLA compilation cache (launch/run.py): reruns and other seeds of a config load the
  # compiled programs instead of compiling them again. "" turns it off; the environment variable
  # JAX_COMPILATION_CACHE_DIR, if set, takes precedence.
  c.compilation_cache_dir = "~/.cache/gr_jax/xla"
  return c


def split(first: int, tasks: int):
  """Preset: ``first`` classes in phase 0, the rest spread evenly over ``tasks - 1`` phases."""
  def apply(c):
    c.protocol.nc_first_task = first
    c.protocol.num_tasks = tasks
  return apply


def scenario(name: str):
  def apply(c):
    c.protocol.scenario = name
  return apply


SCENARIOS = {name: scenario(name) for name in ("shuffled", "ordered", "conventional")}


def imagenet_style(c: ml_collections.ConfigDict) -> None:
  """ResNet-18 at 224 px, 90 epochs (lr ÷10 at 30 and 60), wd 1e-4 (docs/method.md §5)."""
  c.data.image_size = 224
  c.model = "resnet18"
  c.augment = "imagenet"
  c.optim.epochs = 90
  c.optim.milestones = (30, 60)
  c.optim.weight_decay = 1e-4
  c.checkpoint.every_epochs = 5


def apply_presets(c: ml_collections.ConfigDict, arg: str | None, scenarios: dict) -> None:
  """Applies comma-separated presets: scenario names from ``scenarios``, method names, ``smoke``."""
  for preset in [p for p in (arg or "").split(",") if p]:
    if preset in scenarios:
      scenarios[preset](c)
    elif preset in METHODS:
      c.method.name = preset
      c.method.update(METHODS[preset])
    elif preset == "smoke":
      # Every phase of the protocol on real data in about a minute on 2 CPU cores: one epoch,
      # a slice of each class, a small exemplar budget and the one-block-per-stage ResNet.
      c.optim.epochs = 1
      c.optim.milestones = ()
      c.protocol.max_train_per_class = 20
      c.protocol.max_test_per_class = 10
      c.protocol.val_fraction = 0.0
      c.memory.per_class = 5
      c.checkpoint.every_epochs = 1
      if c.model == "resnet32":
        c.model = "resnet8"
      if c.augment == "imagenet":  # ResNet-18 on 32 px images: the pipeline at CPU cost
        c.data.image_size = 32
        c.protocol.max_train_per_class = 10
        c.protocol.max_test_per_class = 5
    else:
      raise ValueError(f"unknown config preset {preset!r}; known: {sorted(scenarios)} "
                       f"{sorted(METHODS)} smoke")
