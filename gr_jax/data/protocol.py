"""The class-incremental long-tailed protocol (docs/method.md §6): which images and classes, when.

Given a dataset's original labels, :func:`make_plan` decides, once and deterministically:

1. the long-tailed training subset (§6.2) — on CIFAR-100 exactly the reference's 10,847 images;
2. the class order (§6.3): class *position* p (the classifier's class axis) holds original label
   ``class_order[p]``;
3. the task split (§6.4): phase t introduces positions ``class_range(t)``;
4. the validation hold-out (§6.5), taken from each class's training images.

The result is a :class:`Plan` of index arrays into the dataset's ``x_train`` / ``x_test``; nothing
is copied or decoded here, so the plan is cheap to build and to log.
"""

from __future__ import annotations

import dataclasses

from absl import logging
import numpy as np

SCENARIOS = ("shuffled", "ordered", "conventional")
PROFILES = ("exponential", "step", "none")

# The fixed CIFAR-100 class order of the reference implementation (its ``cifar100_lt`` and
# ``cifar100_conv`` configurations; iCaRL's seed-1993 order). Position p holds original label
# CIFAR100_SHUFFLED_ORDER[p]. Part of the protocol: the paper's "shuffled LT" numbers use it.
CIFAR100_SHUFFLED_ORDER = (
    68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89, 3, 92, 55, 9, 26, 80, 43, 38,
    58, 70, 77, 1, 85, 19, 17, 50, 28, 53, 13, 81, 45, 82, 6, 59, 83, 16, 15, 44,
    91, 41, 72, 60, 79, 52, 20, 10, 31, 54, 37, 95, 14, 71, 96, 98, 97, 2, 64, 66,
    42, 22, 35, 86, 24, 34, 87, 21, 99, 0, 88, 27, 18, 94, 11, 12, 47, 25, 30, 46,
    62, 69, 36, 61, 7, 63, 75, 5, 32, 4, 51, 48, 73, 93, 39, 67, 29, 49, 57, 33,
)

# Validation hold-out of the reference implementation (FACIL's ``validation=0.1``). The paper's
# numbers come with it: 10 % of each class's (long-tailed) training images are held out and only
# logged. gr_jax callers pass the fraction explicitly; this is the value that reproduces the paper.
REFERENCE_VAL_FRACTION = 0.1


def _is_cifar100(dataset_name: str) -> bool:
  """``cifar100``, ``CIFAR-100``, ``cifar_100`` and ``cifar100_lt`` all name CIFAR-100."""
  key = dataset_name.lower().replace("-", "").replace("_", "")
  return key in ("cifar100", "cifar100lt")


def long_tail_counts(n_max: int, num_classes: int, rho: float, profile: str) -> np.ndarray:
  """Per-class training counts of a long-tailed profile, indexed by the class's rank i.

  Args:
    n_max: images of the largest (first) class.
    num_classes: K.
    rho: imbalance ratio n_min / n_max in (0, 1] (0.01 in the paper, i.e. "ratio 100").
    profile: ``exponential``: n_i = int(n_max · rho^(i / (K − 1))) (the reference's formula,
      float64 arithmetic, truncation); ``step``: the first ⌊K/2⌋ classes get n_max and the rest
      int(n_max · rho); ``none``: every class gets n_max.

  Returns:
    int64 ``[K]`` counts.

  Raises:
    ValueError: rho outside (0, 1], unknown profile, non-positive n_max or K.
  """
  if not 0.0 < rho <= 1.0:
    raise ValueError(f"rho must be in (0, 1] (n_min / n_max, e.g. 0.01 for imbalance ratio 100), "
                     f"got {rho}")
  if num_classes < 1 or n_max < 1:
    raise ValueError(f"need num_classes >= 1 and n_max >= 1, got {num_classes} and {n_max}")
  if profile == "exponential":
    if num_classes == 1:
      return np.array([int(n_max)], np.int64)
    # Same float expression as the reference so that int() truncates identically.
    return np.array([int(n_max * (rho ** (i / (num_classes - 1.0)))) for i in range(num_classes)],
                    np.int64)
  if profile == "step":
    head = num_classes // 2
    return np.array([int(n_max)] * head + [int(n_max * rho)] * (num_classes - head), np.int64)
  if profile == "none":
    return np.full((num_classes,), int(n_max), np.int64)
  raise ValueError(f"unknown long-tail profile {profile!r}: expected one of {', '.join(PROFILES)}")


def select_long_tail(labels: np.ndarray, counts: np.ndarray, seed: int = 0) -> np.ndarray:
  """The reference's long-tailed subset: exactly which training images are kept.

  Reproduces ``IMBALANCECIFAR100.gen_imbalanced_data``: ``np.random.seed(seed)`` once, then for each
  original label c = 0..K−1 in order, shuffle the indices of label c (in dataset order) and keep the
  first ``counts[c]``. A private ``np.random.RandomState(seed)`` draws the same numbers as the
  legacy global seed without touching global state.

  Args:
    labels: ``[N]`` original labels 0..K−1.
    counts: ``[K]`` images to keep per original label.
    seed: the reference uses 0.

  Returns:
    int64 indices into ``labels``, grouped by label (0 first) and, inside a label, in the shuffled
    order (not sorted) — the order the reference stores its subset in.

  Raises:
    ValueError: a class has fewer images than requested.
  """
  labels = np.asarray(labels)
  counts = np.asarray(counts)
  rng = np.random.RandomState(seed)
  kept = []
  for c in range(counts.shape[0]):
    idx = np.where(labels == c)[0]
    if counts[c] > idx.size:
      raise ValueError(f"class {c} has {idx.size} training images but the long-tail profile asks "
                       f"for {counts[c]}; lower n_max to at most the smallest class size")
    rng.shuffle(idx)
    kept.append(idx[:counts[c]])
  return np.concatenate(kept).astype(np.int64) if kept else np.zeros((0,), np.int64)


def class_order(scenario: str, num_classes: int, dataset_name: str, seed: int) -> np.ndarray:
  """Original label at each class position.

  * ``shuffled``: CIFAR-100 uses the reference's fixed order (:data:`CIFAR100_SHUFFLED_ORDER`);
    other datasets ``np.random.RandomState(seed).permutation(K)``.
  * ``ordered``: ``0..K−1`` — with the exponential profile over original labels, head classes come
    first ("ordered LT").
  * ``conventional``: balanced data in the *same order as shuffled* (the reference's
    ``cifar100_conv`` uses the fixed order above; docs/method.md §6.3 "same order").

  Args:
    scenario: ``shuffled``, ``ordered`` or ``conventional``.
    num_classes: K.
    dataset_name: selects CIFAR-100's fixed order.
    seed: permutation seed for datasets without a fixed order.

  Returns:
    int32 ``[K]`` permutation of ``0..K−1``.
  """
  if scenario not in SCENARIOS:
    raise ValueError(f"unknown scenario {scenario!r}: expected one of {', '.join(SCENARIOS)}")
  if scenario == "ordered":
    return np.arange(num_classes, dtype=np.int32)
  if _is_cifar100(dataset_name):
    if num_classes != len(CIFAR100_SHUFFLED_ORDER):
      raise ValueError(f"dataset {dataset_name!r} is CIFAR-100 but has {num_classes} classes; the "
                       "fixed CIFAR-100 class order needs all 100")
    return np.array(CIFAR100_SHUFFLED_ORDER, np.int32)
  return np.random.RandomState(seed).permutation(num_classes).astype(np.int32)


def _order_note(scenario: str, dataset_name: str, seed: int) -> str:
  """Which of :func:`class_order`'s orders a plan uses, for its log line."""
  if scenario == "ordered":
    return "labels 0..K-1"
  if _is_cifar100(dataset_name):
    return f"the reference's fixed CIFAR-100 order (dataset name {dataset_name!r})"
  return f"permutation seed {seed}"


def task_sizes(num_classes: int, nc_first_task: int | None, num_tasks: int) -> tuple[int, ...]:
  """Classes per phase: ``nc_first_task`` first, the rest split evenly.

  Args:
    num_classes: K.
    nc_first_task: classes of phase 0; None splits all K evenly (LFS).
    num_tasks: number of phases T (including phase 0).

  Returns:
    T sizes summing to K.

  Raises:
    ValueError: the split does not divide; the message suggests valid values.
  """
  if num_tasks < 1:
    raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
  if nc_first_task is None:
    if num_classes % num_tasks:
      valid = [t for t in range(1, num_classes + 1) if num_classes % t == 0]
      raise ValueError(f"{num_classes} classes cannot be split evenly into {num_tasks} tasks; "
                       f"use num_tasks in {valid} or set nc_first_task")
    return (num_classes // num_tasks,) * num_tasks
  if not 1 <= nc_first_task <= num_classes:
    raise ValueError(f"nc_first_task must be in [1, {num_classes}], got {nc_first_task}")
  rest = num_classes - nc_first_task
  if num_tasks == 1:
    if rest:
      raise ValueError(f"one task must hold all {num_classes} classes, but nc_first_task="
                       f"{nc_first_task}; use nc_first_task={num_classes} or more tasks")
    return (num_classes,)
  if rest == 0:
    raise ValueError(f"nc_first_task={nc_first_task} takes all {num_classes} classes, leaving "
                     f"none for the other {num_tasks - 1} tasks; use num_tasks=1 or a smaller "
                     "nc_first_task")
  if rest % (num_tasks - 1):
    valid = [d + 1 for d in range(1, rest + 1) if rest % d == 0]
    raise ValueError(f"after the first task's {nc_first_task} classes, the remaining {rest} "
                     f"classes cannot be split evenly into {num_tasks - 1} tasks; with "
                     f"nc_first_task={nc_first_task} use num_tasks in {valid}")
  return (nc_first_task,) + (rest // (num_tasks - 1),) * (num_tasks - 1)


def _frozen(array: np.ndarray, dtype) -> np.ndarray:
  out = np.array(array, dtype=dtype)
  out.flags.writeable = False
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """Which classes and images each phase uses. All arrays are read-only.

  Attributes:
    class_order: int32 ``[K]``: original label of class position p.
    label_to_position: int32 ``[K]``: position of original label l (inverse of ``class_order``).
    task_sizes: classes per phase.
    train_idx: per phase, sorted int64 indices into ``x_train`` of that phase's new-class training
      images (after long-tail selection and validation hold-out).
    val_idx: per phase, sorted int64 indices into ``x_train`` of the held-out validation images.
    test_idx: per phase, sorted int64 indices into ``x_test`` of the phase's classes' test images.
    train_counts: int32 ``[K]``: N_c by class position (after hold-out) — the N_c of method.md §2.
  """
  class_order: np.ndarray
  label_to_position: np.ndarray
  task_sizes: tuple[int, ...]
  train_idx: tuple[np.ndarray, ...]
  val_idx: tuple[np.ndarray, ...]
  test_idx: tuple[np.ndarray, ...]
  train_counts: np.ndarray

  @property
  def num_phases(self) -> int:
    return len(self.task_sizes)

  @property
  def num_classes(self) -> int:
    return int(self.class_order.shape[0])

  @property
  def phase_of_class(self) -> np.ndarray:
    """int32 ``[K]``: the phase in which each class position is new."""
    return np.repeat(np.arange(self.num_phases, dtype=np.int32), self.task_sizes)

  def class_range(self, t: int) -> tuple[int, int]:
    """(start, stop) class positions introduced in phase t."""
    if not 0 <= t < self.num_phases:
      raise IndexError(f"phase {t} out of range for {self.num_phases} phases")
    start = int(sum(self.task_sizes[:t]))
    return start, start + int(self.task_sizes[t])

  def seen_classes(self, t: int) -> np.ndarray:
    """int32 positions ``[0, stop)`` of all classes seen by the end of phase t."""
    return np.arange(self.class_range(t)[1], dtype=np.int32)

  def positions(self, labels: np.ndarray) -> np.ndarray:
    """Original labels -> class positions (int32)."""
    return self.label_to_position[np.asarray(labels)].astype(np.int32)


def _check_labels(y: np.ndarray, what: str) -> None:
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{what} must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
  if y.size == 0:
    raise ValueError(f"{what} is empty")
  if y.min() < 0:
    raise ValueError(f"{what} has negative labels (min {y.min()})")


def make_plan(y_train: np.ndarray, y_test: np.ndarray, *, dataset_name: str, scenario: str,
              profile: str, rho: float, nc_first_task: int | None, num_tasks: int,
              val_fraction: float, seed: int, lt_seed: int = 0, n_max: int | None = None,
              num_classes: int | None = None, max_train_per_class: int | None = None,
              max_test_per_class: int | None = None) -> Plan:
  """Builds the protocol's :class:`Plan` (docs/method.md §6.2–6.5).

  Args:
    y_train: ``[N]`` original training labels, every class 0..K−1 present.
    y_test: ``[N_test]`` original test labels of the same K classes.
    dataset_name: ``cifar100`` selects the reference's fixed class order.
    scenario: ``shuffled`` / ``ordered`` (long-tailed) or ``conventional`` (all images, no LT).
    profile: long-tail profile (``exponential``, ``step``, ``none``); validated but unused for
      ``conventional``.
    rho: imbalance ratio n_min / n_max in (0, 1].
    nc_first_task: classes of phase 0 (None: even split).
    num_tasks: number of phases.
    val_fraction: per class, ``np.round(val_fraction · n_c)`` training images are held out for
      validation, drawn with ``RandomState(seed)``. The reference (and thus the paper's numbers)
      uses 0.1 (:data:`REFERENCE_VAL_FRACTION`); 0.0 trains on everything. A class always keeps
      at least one training image.
    seed: seeds the class permutation (datasets without a fixed order) and the hold-out.
    lt_seed: seed of the long-tail selection (the reference's 0).
    n_max: images of the largest class; default the smallest per-class count of ``y_train`` (500
      for CIFAR-100).
    num_classes: keep only the first ``num_classes`` classes of the order (None: all). For smoke
      runs and tests; the long-tail profile is still that of the full dataset.
    max_train_per_class: keep at most this many training images per class (smallest indices
      first; None: all). For smoke runs and tests only: it changes N_c.
    max_test_per_class: likewise for test images.

  Returns:
    The plan.

  Raises:
    ValueError: inconsistent labels, unknown scenario/profile, bad rho/val_fraction/split.
  """
  y_train = np.asarray(y_train)
  y_test = np.asarray(y_test)
  _check_labels(y_train, "y_train")
  _check_labels(y_test, "y_test")
  if scenario not in SCENARIOS:
    raise ValueError(f"unknown scenario {scenario!r}: expected one of {', '.join(SCENARIOS)}")
  if profile not in PROFILES:
    raise ValueError(f"unknown long-tail profile {profile!r}: expected one of "
                     f"{', '.join(PROFILES)}")
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction} (the reference uses "
                     f"{REFERENCE_VAL_FRACTION})")
  used_classes = num_classes
  num_classes = int(y_train.max()) + 1
  full_counts = np.bincount(y_train, minlength=num_classes)
  if (full_counts == 0).any():
    raise ValueError(f"y_train has labels up to {num_classes - 1} but classes "
                     f"{np.flatnonzero(full_counts == 0)[:10].tolist()} have no training images; "
                     "labels must be exactly 0..K-1")
  test_counts = np.bincount(y_test, minlength=num_classes)
  if test_counts.shape[0] != num_classes:
    raise ValueError(f"y_test has labels up to {y_test.max()} but y_train only has {num_classes} "
                     "classes")
  if (test_counts == 0).any():
    logging.warning("classes %s have no test images", np.flatnonzero(test_counts == 0)[:10])
  if used_classes is None:
    used_classes = num_classes
  if not 0 < used_classes <= num_classes:
    raise ValueError(f"protocol.num_classes={used_classes} must be in [1, {num_classes}] "
                     "(0 or None: all classes)")
  for name, cap in (("max_train_per_class", max_train_per_class),
                    ("max_test_per_class", max_test_per_class)):
    if cap is not None and cap <= 0:
      raise ValueError(f"{name}={cap} must be a positive integer (or None for no cap)")
  sizes = task_sizes(used_classes, nc_first_task, num_tasks)

  # 1. Long-tailed subset, by ORIGINAL label (the reference applies the profile before ordering).
  if scenario == "conventional":
    long_tail_counts(1, num_classes, rho, profile)  # Validates rho/profile even though unused.
    selected = np.arange(y_train.shape[0], dtype=np.int64)
  else:
    n_max = int(full_counts.min()) if n_max is None else int(n_max)
    counts = long_tail_counts(n_max, num_classes, rho, profile)
    if (counts == 0).any():
      raise ValueError(f"long-tail profile {profile!r} with n_max={n_max}, rho={rho} gives "
                       f"{int((counts == 0).sum())} classes no images; raise rho or n_max")
    selected = select_long_tail(y_train, counts, seed=lt_seed)

  # 2. Class order.
  order = class_order(scenario, num_classes, dataset_name, seed)
  label_to_position = np.empty(num_classes, np.int32)
  label_to_position[order] = np.arange(num_classes, dtype=np.int32)

  # 3. Validation hold-out, class by class in position order with one RandomState.
  rng = np.random.RandomState(seed)
  train_pos = label_to_position[y_train]
  sel_pos = train_pos[selected]
  keep_by_pos, val_by_pos = [], []
  train_counts = np.zeros(used_classes, np.int32)
  for p in range(used_classes):
    idx = np.sort(selected[sel_pos == p])[:max_train_per_class]
    n_val = min(int(np.round(val_fraction * idx.size)), idx.size - 1)
    held = rng.permutation(idx)[:n_val] if n_val > 0 else idx[:0]
    keep = np.setdiff1d(idx, held, assume_unique=True)
    keep_by_pos.append(keep)
    val_by_pos.append(held)
    train_counts[p] = keep.size

  # 4. Per-phase index sets.
  test_pos = label_to_position[y_test]
  train_idx, val_idx, test_idx = [], [], []
  start = 0
  for size in sizes:
    stop = start + size
    train_idx.append(_frozen(np.sort(np.concatenate(keep_by_pos[start:stop])), np.int64))
    val_idx.append(_frozen(np.sort(np.concatenate(val_by_pos[start:stop])), np.int64))
    test_idx.append(_frozen(np.sort(np.concatenate(
        [np.flatnonzero(test_pos == p)[:max_test_per_class] for p in range(start, stop)])),
        np.int64))
    start = stop

  plan = Plan(class_order=_frozen(order[:used_classes], np.int32),
              label_to_position=_frozen(label_to_position, np.int32),
              task_sizes=tuple(int(s) for s in sizes), train_idx=tuple(train_idx),
              val_idx=tuple(val_idx), test_idx=tuple(test_idx),
              train_counts=_frozen(train_counts, np.int32))
  logging.info("plan (%s, %s rho=%s, class order: %s): %d classes in phases %s; %d train / %d val "
               "images; N_c from %d to %d", scenario, profile, rho,
               _order_note(scenario, dataset_name, seed), used_classes,
               plan.task_sizes, int(train_counts.sum()),
               int(sum(v.size for v in val_idx)), int(train_counts.min()), int(train_counts.max()))
  return plan
