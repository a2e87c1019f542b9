"""The run configuration in one place: defaults, presets, validation and the results-determining key.

``configs/*.py`` build on :func:`base_config` and :func:`apply_presets`; the trainer calls
:func:`validate` before it reads any data; checkpoints and seed pooling compare runs through
:func:`results_config` (the entries that determine a run's results) and :func:`fingerprint`.
Unset optional entries are ``None`` (``ml_collections`` placeholders, typed, so that
``--config.x=...`` still parses).
"""

import hashlib
import json
import math
from typing import Any, Mapping

from absl import logging
import ml_collections
from ml_collections import config_dict

# Method presets: the paper's method, its ablations and the fine-tuning baseline (docs/method.md).
METHODS = {
    "dgr": dict(reweighting="dgr", kd="dakd", logit_prior=True),
    "no_dgr": dict(reweighting="gr", kd="dakd", logit_prior=True),
    "no_dakd": dict(reweighting="dgr", kd="plain", logit_prior=True),
    "no_prior": dict(reweighting="dgr", kd="dakd", logit_prior=False),
    "finetune": dict(reweighting="none", kd="plain", logit_prior=False),
}
REWEIGHTINGS = ("dgr", "gr", "none")
KDS = ("dakd", "plain", "none")
DTYPES = ("float32", "bfloat16")

# Entries that change how a run is observed, resumed or spread over devices, not what it computes.
OBSERVATION_KEYS = ("checkpoint", "num_devices", "eval_chunk", "epoch_as_scan", "epochs_per_call",
                    "compilation_cache_dir", "diagnostics")
# Which seeds a run trains: runs that differ only here pool into one mean ± std.
SEED_KEYS = ("seed", "seeds")
# Entries of ``config.data`` that say where the data lives, not what it holds. Checkpoints key the
# data by a digest of its content and pooling compares the runs' plans, so a dataset moved to
# another path or machine still resumes and pools.
DATA_LOCATION_KEYS = ("path", "data_dir", "download")


def base_config() -> ml_collections.ConfigDict:
  """Every entry a run reads, with the paper's CIFAR-100 settings (docs/method.md §5)."""
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(dict(
      source="tfds",                          # tfds | npz | folder | list
      name=config_dict.placeholder(str),      # tfds name (cifar100, food101); names other sources
      path=config_dict.placeholder(str),      # npz file, image folder or folder of train/test.txt
      data_dir=config_dict.placeholder(str),  # tfds data_dir (or the root of list-file paths)
      image_size=32,                          # images are stored and trained at this size
      download=True,                          # tfds only: download and prepare if absent
  ))
  c.protocol = ml_collections.ConfigDict(dict(
      scenario="shuffled",     # shuffled | ordered | conventional (balanced)
      profile="exponential",   # exponential | step | none
      rho=0.01,                # imbalance ratio n_min / n_max
      nc_first_task=config_dict.placeholder(int),  # classes of phase 0 (None: an even split)
      num_tasks=10,
      val_fraction=0.1,        # per-class hold-out as the reference (only logged, never used)
      order_seed=1993,         # class order for datasets without a fixed one
      lt_seed=0,               # the reference's numpy seed for the LT selection
      # Smoke runs only: keep the first classes of the order, cap images per class.
      num_classes=config_dict.placeholder(int),
      max_train_per_class=config_dict.placeholder(int),
      max_test_per_class=config_dict.placeholder(int),
  ))
  c.model = "resnet32"
  c.augment = "cifar"
  c.method = ml_collections.ConfigDict(dict(kd_lambda_base=0.7, temperature=2.0, **METHODS["dgr"]))
  c.memory = ml_collections.ConfigDict(dict(per_class=20, selection="herding"))
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=0.1, momentum=0.9, weight_decay=5e-4, epochs=160, milestones=(80, 120),
      lr_decay=0.1, batch_size=128,
      clip_norm=config_dict.FieldReference(10000.0, field_type=float)))  # None: no clipping
  c.seed = 0
  c.seeds = config_dict.placeholder(str)  # e.g. "0,1,2,3,4": the seeds in turn, pooled at the end
  c.dtype = "float32"  # float32 | bfloat16 (compute; params, norms and losses stay float32)
  # BatchNorm batch variance as E[x²] − E[x]² (one pass, 9 % faster on an H100) or, if False, the
  # two-pass E[(x − E[x])²] of torch (RESULTS.md, "BatchNorm's variance in one pass or two").
  c.bn_fast_variance = True
  c.num_devices = config_dict.placeholder(int)  # None: all local devices (data parallel)
  c.eval_chunk = 500         # test / herding images per compiled call
  c.epoch_as_scan = "auto"   # one lax.scan per epoch (auto: on GPU/TPU; XLA:CPU loops are slow)
  # Epochs per compiled call: the host reads metrics and may checkpoint only between calls.
  c.epochs_per_call = 10
  # Checkpoints: at every phase end, after the first call that ends every_seconds after the last
  # save, and on SIGTERM / SIGINT (then the run stops); saves are written in the background.
  c.checkpoint = ml_collections.ConfigDict(dict(every_seconds=300.0, keep=3))
  c.diagnostics = True  # per-class diagnostics.npz / diagnostics.png and diag/* scalars
  # Persistent XLA compilation cache (launch/run.py): reruns and other seeds of a config load the
  # compiled programs instead of compiling them again. None turns it off; the environment variable
  # JAX_COMPILATION_CACHE_DIR, if set, takes precedence.
  c.compilation_cache_dir = config_dict.FieldReference("~/.cache/gr_jax/xla", field_type=str)
  return c


# --- Presets: ``--config=configs/x.py:a,b``. ---

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


def smoke(c: ml_collections.ConfigDict) -> None:
  """Every phase of the protocol on real data in about a minute on 2 CPU cores: one epoch, a slice
  of each class, a small exemplar budget and the one-block-per-stage ResNet."""
  c.optim.epochs = 1
  c.optim.milestones = ()
  c.protocol.max_train_per_class = 20
  c.protocol.max_test_per_class = 10
  c.protocol.val_fraction = 0.0
  c.memory.per_class = 5
  if c.model == "resnet32":
    c.model = "resnet8"
  if c.augment == "imagenet":  # ResNet-18 on 32 px images: the pipeline at CPU cost
    c.data.image_size = 32
    c.protocol.max_train_per_class = 10
    c.protocol.max_test_per_class = 5


def apply_presets(c: ml_collections.ConfigDict, arg: str | None, scenarios: dict) -> None:
  """Applies comma-separated presets: scenario names from ``scenarios``, method names, ``smoke``."""
  for preset in [p for p in (arg or "").split(",") if p]:
    if preset in scenarios:
      scenarios[preset](c)
    elif preset in METHODS:
      c.method.update(METHODS[preset])
    elif preset == "smoke":
      smoke(c)
    else:
      raise ValueError(f"unknown config preset {preset!r}; known: {sorted(scenarios)} "
                       f"{sorted(METHODS)} smoke")


# --- Validation: every entry checked once, before any data is read or file written. ---

def _entry(config, key: str) -> Any:
  value = config
  for part in key.split("."):
    value = value[part]
  return value


def _require_int(config, key: str, problem: str, minimum: int = 1) -> None:
  """ValueError ``config.<key>=<value>: <problem>`` unless the entry is an int >= ``minimum``."""
  value = _entry(config, key)
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"config.{key}={value!r}: {problem}")


def _require_choice(config, key: str, choices: tuple[str, ...]) -> None:
  value = _entry(config, key)
  if value not in choices:
    raise ValueError(f"config.{key}={value!r}: use {' | '.join(choices)}")


def _check_optimiser(config) -> None:
  """The SGD schedule's entries: counts positive, rates in range, milestones increasing epochs."""
  for key in ("optim.epochs", "optim.batch_size"):
    _require_int(config, key, "must be an integer >= 1")
  optim = config.optim
  for key, in_range, meaning in (("learning_rate", lambda v: v > 0, "> 0"),
                                 ("lr_decay", lambda v: v > 0, "> 0 (0.1: ÷10 at each milestone)"),
                                 ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
                                 ("weight_decay", lambda v: v >= 0, ">= 0"),
                                 ("clip_norm", lambda v: v > 0, "> 0, or None for no clipping")):
    value = optim[key]
    if key == "clip_norm" and value is None:
      continue
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        or not in_range(value)):
      raise ValueError(f"config.optim.{key}={value!r}: must be a finite number {meaning}")
  milestones = optim.milestones
  if (not isinstance(milestones, (tuple, list))
      or not all(isinstance(m, int) and not isinstance(m, bool) for m in milestones)
      or any(m < 1 for m in milestones) or list(milestones) != sorted(set(milestones))):
    raise ValueError(f"config.optim.milestones={milestones!r}: give increasing epoch numbers "
                     "(the learning rate is multiplied by lr_decay at each), e.g. "
                     "--config.optim.milestones=80,120, or () for a constant rate")
  late = [m for m in milestones if m >= optim.epochs]
  if late:
    logging.warning("config.optim.milestones %s reach no epoch of a %d-epoch phase: the learning "
                    "rate does not decay there", late, optim.epochs)


def seeds(config) -> tuple[int, ...]:
  """The seeds a run trains: ``config.seeds`` ("0,1,2") if set, else ``(config.seed,)``."""
  if config.seeds is None:
    return (int(config.seed),)
  try:
    parsed = tuple(int(s) for s in str(config.seeds).split(",") if s.strip())
  except ValueError:
    raise ValueError(f"config.seeds={config.seeds!r}: give comma-separated integers, e.g. "
                     "--config.seeds=0,1,2") from None
  if not parsed or len(set(parsed)) != len(parsed):
    raise ValueError(f"config.seeds={config.seeds!r}: give distinct comma-separated integers, "
                     "e.g. --config.seeds=0,1,2")
  return parsed


def validate(config) -> None:
  """Raises ValueError naming the entry and the fix for a setting the trainer cannot run."""
  _require_choice(config, "method.reweighting", REWEIGHTINGS)
  _require_choice(config, "method.kd", KDS)
  _require_choice(config, "dtype", DTYPES)
  _require_choice(config, "memory.selection", ("herding", "random"))
  if str(config.epoch_as_scan).lower() not in ("auto", "true", "false"):
    raise ValueError(f"config.epoch_as_scan={config.epoch_as_scan!r}: use auto, true or false")
  if config.num_devices is not None:
    _require_int(config, "num_devices", "use None (all visible devices) or a positive integer")
  _require_int(config, "memory.per_class", "the exemplar budget must be a positive integer "
               "(images kept per old class, 20 in the paper)")
  _check_optimiser(config)
  _require_int(config, "epochs_per_call", "must be an integer >= 1 (epochs per compiled call)")
  every = config.checkpoint.every_seconds
  if isinstance(every, bool) or not isinstance(every, (int, float)) or not every >= 0:
    raise ValueError(f"config.checkpoint.every_seconds={every!r}: must be a number >= 0 (seconds "
                     "between checkpoints within a phase; 0 saves after every call)")
  _require_int(config, "checkpoint.keep", "must be an integer >= 1 (checkpoints kept; with none a "
               "run cannot resume)")
  seeds(config)


def for_seed(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
  """``config`` as the single-seed run of ``seed`` (what one seed of a multi-seed run trains)."""
  one = config.copy_and_resolve_references()
  with one.unlocked():
    one.seed = seed
    one.seeds = None
  return one


# --- What determines results: the key of checkpoints and of seed pooling. ---

def results_config(config: Mapping[str, Any], *, data_location: bool = True,
                   seeds: bool = True) -> dict[str, Any]:
  """The config entries that determine a run's results (a dict, e.g. ``config.to_dict()``).

  Leaves out :data:`OBSERVATION_KEYS`; with ``data_location=False`` also where the data lives
  (:data:`DATA_LOCATION_KEYS`), for comparisons that check the data's content another way; with
  ``seeds=False`` also the seeds (:data:`SEED_KEYS`), for pooling runs of other seeds.
  """
  dropped = OBSERVATION_KEYS + (() if seeds else SEED_KEYS)
  out = {k: v for k, v in config.items() if k not in dropped}
  if not data_location and isinstance(out.get("data"), Mapping):
    out["data"] = {k: v for k, v in out["data"].items() if k not in DATA_LOCATION_KEYS}
  return out


def _as_json(value: Any) -> Any:
  """A config value as it reads back from JSON (tuples become lists)."""
  return json.loads(json.dumps(value, default=str))


def differences(a: Mapping[str, Any], b: Mapping[str, Any],
                prefix: str = "") -> dict[str, tuple[Any, Any]]:
  """``{dotted key: (value in a, value in b)}`` for every entry that differs, sections followed down
  to their entries (``optim.learning_rate``), sorted by key; values compare as JSON."""
  out = {}
  for key in sorted(set(a) | set(b)):
    x, y = _as_json(a.get(key)), _as_json(b.get(key))
    if x == y:
      continue
    if isinstance(x, Mapping) and isinstance(y, Mapping):
      out.update(differences(x, y, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = (x, y)
  return out


def fingerprint(config: Mapping[str, Any], data_digest: str) -> str:
  """A stable hash of what determines a run's results: :func:`results_config` wherever the data
  lives, and the data's content (:func:`gr_jax.data.sources.dataset_digest`)."""
  blob = json.dumps(results_config(config, data_location=False), sort_keys=True, default=str)
  return hashlib.sha256(f"{blob}\ndata:{data_digest}".encode()).hexdigest()[:16]
