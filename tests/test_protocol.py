"""The protocol against the reference's exact CIFAR-100-LT selection and hand-computed cases."""

import json

import numpy as np
import pytest

from gr_jax.data import protocol


@pytest.fixture(scope="module")
def cifar_labels(cifar100_npz):
  # Only the label arrays: the protocol never touches pixels.
  with np.load(cifar100_npz) as archive:
    return archive["y_train"], archive["y_test"]


@pytest.fixture(scope="module")
def reference(lt_fixture):
  with open(lt_fixture) as f:
    return json.load(f)


def _plan(cifar_labels, **overrides):
  kwargs = dict(dataset_name="cifar100", scenario="shuffled", profile="exponential", rho=0.01,
                nc_first_task=None, num_tasks=20, val_fraction=0.0, seed=0)
  kwargs.update(overrides)
  return protocol.make_plan(*cifar_labels, **kwargs)


# --- long-tail counts and selection ---------------------------------------------------------------


def test_exponential_counts_match_reference(reference):
  counts = protocol.long_tail_counts(500, 100, 0.01, "exponential")
  np.testing.assert_array_equal(counts, reference["counts_by_label"])
  assert counts.sum() == reference["total"] == 10847
  assert counts[0] == 500 and counts[-1] == 5 and counts[1] == 477


def test_step_and_none_counts_hand_computed():
  np.testing.assert_array_equal(protocol.long_tail_counts(500, 6, 0.1, "step"),
                                [500, 500, 500, 50, 50, 50])
  # Odd K: the first floor(K/2) classes are head classes.
  np.testing.assert_array_equal(protocol.long_tail_counts(100, 5, 0.05, "step"),
                                [100, 100, 5, 5, 5])
  np.testing.assert_array_equal(protocol.long_tail_counts(37, 4, 0.5, "none"), [37, 37, 37, 37])
  # Exponential by hand: 100 * 0.25 ** (i / 2) = 100, 50, 25.
  np.testing.assert_array_equal(protocol.long_tail_counts(100, 3, 0.25, "exponential"),
                                [100, 50, 25])
  np.testing.assert_array_equal(protocol.long_tail_counts(10, 1, 0.5, "exponential"), [10])


@pytest.mark.parametrize("rho", [0.0, -0.1, 1.5])
def test_rho_outside_unit_interval_raises(rho):
  with pytest.raises(ValueError, match="rho must be in"):
    protocol.long_tail_counts(500, 100, rho, "exponential")


def test_unknown_profile_raises(cifar_labels):
  with pytest.raises(ValueError, match="unknown long-tail profile 'linear'"):
    protocol.long_tail_counts(500, 100, 0.01, "linear")
  with pytest.raises(ValueError, match="unknown long-tail profile 'linear'"):
    _plan(cifar_labels, profile="linear")


def test_select_long_tail_equals_reference(cifar_labels, reference):
  y_train, _ = cifar_labels
  selected = protocol.select_long_tail(y_train, reference["counts_by_label"], seed=0)
  assert selected.shape == (10847,)
  offset = 0
  for c in range(100):
    expected = reference["selected_train_indices_by_label"][str(c)]
    got = selected[offset:offset + len(expected)]
    np.testing.assert_array_equal(got, expected, err_msg=f"label {c}")
    assert (y_train[got] == c).all()
    offset += len(expected)
  # Did not touch numpy's global RNG.
  np.random.seed(123)
  before = np.random.rand()
  np.random.seed(123)
  protocol.select_long_tail(y_train, reference["counts_by_label"], seed=0)
  assert np.random.rand() == before


def test_select_long_tail_rejects_too_many():
  with pytest.raises(ValueError, match="class 1 has 2 training images"):
    protocol.select_long_tail(np.array([0, 0, 0, 1, 1]), np.array([3, 3]))


# --- class order and task sizes -------------------------------------------------------------------


def test_class_orders(reference):
  np.testing.assert_array_equal(protocol.class_order("shuffled", 100, "cifar100", seed=7),
                                reference["shuffled_class_order"])
  np.testing.assert_array_equal(protocol.class_order("ordered", 100, "cifar100", seed=7),
                                reference["ordered_class_order"])
  # Conventional = balanced data in the same fixed order (reference's cifar100_conv).
  np.testing.assert_array_equal(protocol.class_order("conventional", 100, "CIFAR-100", seed=7),
                                reference["shuffled_class_order"])
  other = protocol.class_order("shuffled", 101, "food101", seed=3)
  np.testing.assert_array_equal(other, np.random.RandomState(3).permutation(101))
  assert other.dtype == np.int32
  np.testing.assert_array_equal(protocol.class_order("ordered", 101, "food101", seed=3),
                                np.arange(101))
  with pytest.raises(ValueError, match="unknown scenario 'random'"):
    protocol.class_order("random", 100, "cifar100", seed=0)


def test_task_sizes():
  assert protocol.task_sizes(100, None, 20) == (5,) * 20
  assert protocol.task_sizes(100, 50, 11) == (50,) + (5,) * 10
  assert protocol.task_sizes(100, 50, 6) == (50,) + (10,) * 5
  assert protocol.task_sizes(101, 51, 6) == (51,) + (10,) * 5
  assert protocol.task_sizes(100, 100, 1) == (100,)
  with pytest.raises(ValueError, match=r"remaining 50 classes cannot be split evenly into 6 tasks"
                     r".*num_tasks in \[2, 3, 6, 11, 26, 51\]"):
    protocol.task_sizes(100, 50, 7)
  with pytest.raises(ValueError, match=r"100 classes cannot be split evenly into 7 tasks"):
    protocol.task_sizes(100, None, 7)
  with pytest.raises(ValueError, match="num_tasks must be >= 1"):
    protocol.task_sizes(100, None, 0)


# --- plans ----------------------------------------------------------------------------------------


def _check_partition(plan, y_train, y_test, lt_set):
  positions_train = plan.positions(y_train)
  positions_test = plan.positions(y_test)
  seen = np.zeros(len(y_train), bool)
  for t in range(plan.num_phases):
    start, stop = plan.class_range(t)
    assert stop - start == plan.task_sizes[t]
    tr, va, te = plan.train_idx[t], plan.val_idx[t], plan.test_idx[t]
    # Each phase's train/val images are exactly the LT images of its classes.
    phase_lt = lt_set[(positions_train[lt_set] >= start) & (positions_train[lt_set] < stop)]
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, va])), np.sort(phase_lt))
    assert np.intersect1d(tr, va).size == 0
    assert (np.diff(tr) > 0).all() and (np.diff(va) > 0).all()
    assert not seen[tr].any() and not seen[va].any()
    seen[tr] = True
    seen[va] = True
    # Test images: all test images of the phase's classes (balanced: 100 per class).
    np.testing.assert_array_equal(
        te, np.flatnonzero((positions_test >= start) & (positions_test < stop)))
    assert te.size == 100 * (stop - start)
    np.testing.assert_array_equal(np.unique(positions_train[tr]), np.arange(start, stop))
    np.testing.assert_array_equal(plan.seen_classes(t), np.arange(stop))
  np.testing.assert_array_equal(np.flatnonzero(seen), np.sort(lt_set))


@pytest.mark.parametrize("nc_first_task,num_tasks,sizes", [
    (None, 20, (5,) * 20),
    (50, 11, (50,) + (5,) * 10),
    (50, 6, (50,) + (10,) * 5),
])
def test_lt_plan_splits(cifar_labels, reference, nc_first_task, num_tasks, sizes):
  y_train, y_test = cifar_labels
  plan = _plan(cifar_labels, nc_first_task=nc_first_task, num_tasks=num_tasks)
  lt_set = np.concatenate([reference["selected_train_indices_by_label"][str(c)]
                           for c in range(100)])
  assert plan.task_sizes == sizes and plan.num_phases == num_tasks and plan.num_classes == 100
  np.testing.assert_array_equal(plan.class_order, reference["shuffled_class_order"])
  np.testing.assert_array_equal(plan.class_order[plan.label_to_position], np.arange(100))
  np.testing.assert_array_equal(plan.phase_of_class, np.repeat(np.arange(num_tasks), sizes))
  # N_c by position = reference counts of the original label at that position (no hold-out).
  np.testing.assert_array_equal(
      plan.train_counts, np.asarray(reference["counts_by_label"])[plan.class_order])
  assert plan.train_counts.sum() == 10847
  assert all(v.size == 0 for v in plan.val_idx)
  _check_partition(plan, y_train, y_test, lt_set)
  # Phase 0 of LFS-20 holds labels 68, 56, 78, 8, 23.
  if num_tasks == 20:
    np.testing.assert_array_equal(np.unique(y_train[plan.train_idx[0]]), [8, 23, 56, 68, 78])
    assert plan.train_idx[0].size == sum(reference["counts_by_label"][c]
                                         for c in (68, 56, 78, 8, 23))
  assert plan.class_range(1) == (sizes[0], sizes[0] + sizes[1])


def test_val_holdout(cifar_labels, reference):
  y_train, y_test = cifar_labels
  plan = _plan(cifar_labels, nc_first_task=50, num_tasks=6,
               val_fraction=protocol.REFERENCE_VAL_FRACTION, seed=1)
  counts = np.asarray(reference["counts_by_label"])[plan.class_order]
  expected_val = np.minimum(np.round(0.1 * counts).astype(int), counts - 1)
  val_pos = plan.positions(y_train[np.concatenate(plan.val_idx)])
  np.testing.assert_array_equal(np.bincount(val_pos, minlength=100), expected_val)
  np.testing.assert_array_equal(plan.train_counts, counts - expected_val)
  # Hand-checked: the head class (label 0, 500 images) loses 50; the tail (label 99, 5) loses 0
  # (round(0.5) = 0 under numpy's banker's rounding).
  assert plan.train_counts[plan.label_to_position[0]] == 450
  assert plan.train_counts[plan.label_to_position[99]] == 5
  assert plan.train_counts[plan.label_to_position[97]] == 5  # 5 images: round(0.5) = 0.
  assert int(sum(v.size for v in plan.val_idx)) == int(expected_val.sum())
  lt_set = np.concatenate([reference["selected_train_indices_by_label"][str(c)]
                           for c in range(100)])
  _check_partition(plan, y_train, y_test, lt_set)
  # Deterministic in the seed; a different seed holds out different images.
  again = _plan(cifar_labels, nc_first_task=50, num_tasks=6, val_fraction=0.1, seed=1)
  np.testing.assert_array_equal(again.val_idx[0], plan.val_idx[0])
  other = _plan(cifar_labels, nc_first_task=50, num_tasks=6, val_fraction=0.1, seed=2)
  assert not np.array_equal(other.val_idx[0], plan.val_idx[0])


def test_holdout_never_empties_a_class():
  y_train = np.array([0] * 10 + [1] * 2 + [2] * 1)
  y_test = np.array([0, 1, 2])
  plan = protocol.make_plan(y_train, y_test, dataset_name="toy", scenario="ordered", profile="none",
                            rho=1.0, nc_first_task=None, num_tasks=1, val_fraction=0.9, seed=0,
                            n_max=1)
  np.testing.assert_array_equal(plan.train_counts, [1, 1, 1])
  plan = protocol.make_plan(y_train, y_test, dataset_name="toy", scenario="conventional",
                            profile="none", rho=1.0, nc_first_task=None, num_tasks=1,
                            val_fraction=0.9, seed=0)
  # round(9) = 9 of 10, round(1.8) = 2 -> capped at 1 of 2, round(0.9) = 1 -> capped at 0 of 1.
  np.testing.assert_array_equal(plan.train_counts, [1, 1, 1])
  assert plan.val_idx[0].size == 9 + 1


def test_conventional_and_ordered_plans(cifar_labels, reference):
  y_train, _ = cifar_labels
  conv = _plan(cifar_labels, scenario="conventional", nc_first_task=50, num_tasks=11)
  assert conv.train_counts.tolist() == [500] * 100
  assert sum(t.size for t in conv.train_idx) == 50000
  np.testing.assert_array_equal(conv.class_order, reference["shuffled_class_order"])
  ordered = _plan(cifar_labels, scenario="ordered")
  np.testing.assert_array_equal(ordered.train_counts, reference["counts_by_label"])
  # Ordered LT: head classes first, so phase 0 is the largest phase.
  assert ordered.train_idx[0].size == sum(reference["counts_by_label"][:5])
  np.testing.assert_array_equal(np.unique(y_train[ordered.train_idx[0]]), np.arange(5))


def test_plan_is_immutable(cifar_labels):
  plan = _plan(cifar_labels)
  with pytest.raises(ValueError):
    plan.train_idx[0][0] = 1
  with pytest.raises(ValueError):
    plan.train_counts[0] = 1
  with pytest.raises(AttributeError):
    plan.task_sizes = (100,)


def test_plan_errors(cifar_labels):
  with pytest.raises(ValueError, match="remaining 50 classes cannot be split evenly into 6 tasks"):
    _plan(cifar_labels, nc_first_task=50, num_tasks=7)
  with pytest.raises(ValueError, match="unknown scenario 'balanced'"):
    _plan(cifar_labels, scenario="balanced")
  with pytest.raises(ValueError, match="rho must be in"):
    _plan(cifar_labels, rho=2.0)
  with pytest.raises(ValueError, match="val_fraction must be in"):
    _plan(cifar_labels, val_fraction=1.0)
  with pytest.raises(ValueError, match="num_tasks must be >= 1"):
    _plan(cifar_labels, num_tasks=0)
  with pytest.raises(ValueError, match=r"classes \[1\] have no training images"):
    protocol.make_plan(np.array([0, 2]), np.array([0, 1, 2]), dataset_name="toy",
                       scenario="ordered", profile="none", rho=1.0, nc_first_task=None,
                       num_tasks=1, val_fraction=0.0, seed=0)
  with pytest.raises(ValueError, match="fixed CIFAR-100 class order needs all 100"):
    protocol.class_order("shuffled", 10, "cifar100", seed=0)


def test_smoke_restrictions_keep_first_classes_and_cap_images(cifar100_npz):
  data = np.load(cifar100_npz)
  plan = protocol.make_plan(data["y_train"], data["y_test"], dataset_name="cifar100",
                            scenario="shuffled", profile="exponential", rho=0.01,
                            nc_first_task=4, num_tasks=3, val_fraction=0.0, seed=0,
                            num_classes=10, max_train_per_class=12, max_test_per_class=6)
  assert plan.num_classes == 10 and plan.task_sizes == (4, 3, 3)
  np.testing.assert_array_equal(plan.class_order, protocol.CIFAR100_SHUFFLED_ORDER[:10])
  lt = np.asarray(protocol.long_tail_counts(500, 100, 0.01, "exponential"))
  np.testing.assert_array_equal(plan.train_counts, np.minimum(lt[plan.class_order], 12))
  for t in range(3):
    start, stop = plan.class_range(t)
    pos = plan.positions(data["y_test"][plan.test_idx[t]])
    np.testing.assert_array_equal(np.bincount(pos, minlength=10)[start:stop], 6)
  with pytest.raises(ValueError, match="num_classes"):
    protocol.make_plan(data["y_train"], data["y_test"], dataset_name="cifar100",
                       scenario="shuffled", profile="exponential", rho=0.01, nc_first_task=4,
                       num_tasks=3, val_fraction=0.0, seed=0, num_classes=101)
