"""Metrics (docs/method.md §6.8) on hand-computed cases."""

import json
import math

from absl.testing import absltest
import chex
import jax.numpy as jnp
import numpy as np

from gr_jax import metrics

NAN = float("nan")

# T = 3 tasks of 2 classes (K = 6). Task 2's classes have 20 test images, the others 10.
NUM_TEST = np.array([10, 10, 10, 10, 20, 20])
TASK_SIZES = (2, 2, 2)
CORRECT_TAG = np.array([
    [8, 6, 0, 0, 0, 0],     # after phase 0: task 0 -> 14/20 = 70
    [5, 3, 9, 7, 0, 0],     # phase 1: 8/20 = 40, 16/20 = 80
    [6, 2, 4, 4, 18, 16],   # phase 2: 40, 40, 34/40 = 85
])
CORRECT_TAW = np.array([
    [8, 6, 0, 0, 0, 0],     # 70
    [7, 5, 9, 8, 0, 0],     # 60, 85
    [8, 6, 7, 9, 19, 17],   # 70, 80, 90
])
# Shot-group boundaries: 500, 101 many; 100, 20 medium; 19, 5 few.
TRAIN_COUNTS = np.array([500, 101, 100, 20, 19, 5])

ACC_TAG = [[70, NAN, NAN], [40, 80, NAN], [40, 40, 85]]
ACC_TAW = [[70, NAN, NAN], [60, 85, NAN], [70, 80, 90]]


def as_float(x):
  """JSON lists (None = NaN) back to a float array."""
  return np.asarray(x, dtype=np.float64)


class MetricsTest(chex.TestCase):

  def test_accuracy_matrices(self):
    tag, taw = metrics.accuracy_matrices(CORRECT_TAG, CORRECT_TAW, NUM_TEST, TASK_SIZES)
    chex.assert_shape(tag, (3, 3))
    np.testing.assert_allclose(tag, ACC_TAG)  # NaN positions must match too
    np.testing.assert_allclose(taw, ACC_TAW)

  def test_forgetting(self):
    f = metrics.forgetting(np.asarray(ACC_TAG, float))
    # f[1,0] = 70 − 40; f[2,0] = max(70, 40) − 40; f[2,1] = 80 − 40; NaN on/above the diagonal.
    np.testing.assert_allclose(f, [[NAN, NAN, NAN], [30, NAN, NAN], [30, 40, NAN]])
    # A task that improves after being learnt has negative forgetting.
    f = metrics.forgetting(np.array([[50, NAN], [60, 70]]))
    np.testing.assert_allclose(f, [[NAN, NAN], [-10, NAN]])

  def test_shot_groups_boundaries(self):
    groups = metrics.shot_groups(TRAIN_COUNTS)
    np.testing.assert_array_equal(groups["many"], [1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(groups["medium"], [0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(groups["few"], [0, 0, 0, 0, 1, 1])

  def test_summarize_every_key(self):
    s = metrics.summarize(CORRECT_TAG, CORRECT_TAW, NUM_TEST, TASK_SIZES, TRAIN_COUNTS)
    json.dumps(s, allow_nan=False)  # JSON-ready: NaN became None
    self.assertIsNone(s["acc_tag"][0][1])
    np.testing.assert_allclose(as_float(s["acc_tag"]), ACC_TAG)
    np.testing.assert_allclose(as_float(s["acc_taw"]), ACC_TAW)
    a = [70, 60, (40 + 40 + 85) / 3]
    np.testing.assert_allclose(s["avg_acc_per_phase"], a)
    np.testing.assert_allclose(s["avg_acc_per_phase_taw"], [70, 72.5, 80])
    # Weighted: all seen test images pooled; phase 2: (6+2+4+4+18+16) / 80 = 62.5.
    weighted = [70, 60, 62.5]
    np.testing.assert_allclose(s["avg_acc_per_phase_weighted"], weighted)
    self.assertAlmostEqual(s["average_incremental_accuracy"], np.mean(a))
    self.assertAlmostEqual(s["average_incremental_accuracy_weighted"], np.mean(weighted))
    self.assertAlmostEqual(s["average_incremental_accuracy_taw"], np.mean([70, 72.5, 80]))
    self.assertAlmostEqual(s["last_accuracy"], 55.0)
    self.assertAlmostEqual(s["last_accuracy_weighted"], 62.5)
    self.assertAlmostEqual(s["last_accuracy_taw"], 80.0)
    np.testing.assert_allclose(as_float(s["forgetting"]),
                               [[NAN, NAN, NAN], [30, NAN, NAN], [30, 40, NAN]])
    self.assertAlmostEqual(s["average_forgetting"], 35.0)
    np.testing.assert_allclose(s["per_class_accuracy"], [60, 20, 40, 40, 90, 80])
    # many {0, 1}: 8/20; medium {2, 3}: 8/20; few {4, 5}: 34/40.
    self.assertEqual(s["shot_accuracy"], {"many": 40.0, "medium": 40.0, "few": 85.0})
    self.assertEqual(s["shot_counts"], {"many": 2, "medium": 2, "few": 2})
    for v in s["avg_acc_per_phase"] + s["per_class_accuracy"]:
      self.assertIsInstance(v, float)

  def test_summarize_single_phase_empty_groups_and_missing_test_images(self):
    s = metrics.summarize(np.array([[3, 0]]), np.array([[4, 0]]), np.array([4, 0]), [2],
                          np.array([200, 150]))
    self.assertEqual(s["acc_tag"], [[75.0]])
    self.assertEqual(s["acc_taw"], [[100.0]])
    self.assertEqual(s["avg_acc_per_phase"], [75.0])
    self.assertEqual(s["average_incremental_accuracy"], 75.0)
    self.assertEqual(s["last_accuracy_weighted"], 75.0)
    self.assertEqual(s["forgetting"], [[None]])
    self.assertIsNone(s["average_forgetting"])
    self.assertEqual(s["per_class_accuracy"], [75.0, None])  # class without test images
    self.assertEqual(s["shot_accuracy"], {"many": 75.0, "medium": None, "few": None})
    self.assertEqual(s["shot_counts"], {"many": 2, "medium": 0, "few": 0})

  def test_uneven_task_sizes(self):
    # 3 base classes then 1: task ownership follows positions [0, 3) and [3, 4).
    correct = np.array([[1, 2, 0, 0], [0, 1, 2, 7]])
    tag, _ = metrics.accuracy_matrices(correct, correct, np.array([2, 2, 2, 10]), [3, 1])
    # Phase 0: 3/6; phase 1: task 0 3/6, task 1 7/10.
    np.testing.assert_allclose(tag, [[50, NAN], [50, 70]])

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "sum to the number of classes"):
      metrics.accuracy_matrices(CORRECT_TAG, CORRECT_TAW, NUM_TEST, [2, 2, 3])
    with self.assertRaisesRegex(ValueError, "one row per phase"):
      metrics.accuracy_matrices(CORRECT_TAG[:2], CORRECT_TAW[:2], NUM_TEST, TASK_SIZES)
    with self.assertRaisesRegex(ValueError, "train_counts"):
      metrics.summarize(CORRECT_TAG, CORRECT_TAW, NUM_TEST, TASK_SIZES, TRAIN_COUNTS[:5])

  @chex.variants(with_jit=True, without_jit=True)
  def test_per_class_correct_hand_example(self):
    # Tasks: classes {0, 1} and {2, 3}.
    task_of_class = jnp.array([0, 0, 1, 1])
    logits = jnp.array([
        [1.0, 0.0, 5.0, 0.0],   # label 0: TAg picks class 2 (other task) -> wrong; TAw right
        [0.0, 0.0, 1.0, 2.0],   # label 3: both right
        [3.0, 2.0, 0.0, 0.0],   # label 1: both wrong (class 0 wins inside the task too)
        [0.0, 0.0, 9.0, 0.0],   # padding row (label 2): ignored
    ])
    labels = jnp.array([0, 3, 1, 2])
    valid = jnp.array([True, True, True, False])
    fn = self.variant(metrics.per_class_correct)
    tag, taw, count = fn(logits, labels, valid, jnp.ones((4,), bool), task_of_class)
    for x in (tag, taw, count):
      chex.assert_shape(x, (4,))
      self.assertEqual(x.dtype, jnp.int32)
    np.testing.assert_array_equal(tag, [0, 0, 0, 1])
    np.testing.assert_array_equal(taw, [1, 0, 0, 1])
    np.testing.assert_array_equal(count, [1, 1, 0, 1])
    # After phase 0 only task 0 is seen: the unseen class 2 can no longer win TAg.
    seen = jnp.array([True, True, False, False])
    tag, taw, count = fn(logits[:1], labels[:1], valid[:1], seen, task_of_class)
    np.testing.assert_array_equal(tag, [1, 0, 0, 0])
    np.testing.assert_array_equal(taw, [1, 0, 0, 0])
    np.testing.assert_array_equal(count, [1, 0, 0, 0])

  def test_per_class_correct_matches_numpy_loop(self):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 10)).astype(np.float32)
    labels = rng.integers(0, 7, size=200)
    valid = rng.uniform(size=200) < 0.8
    seen = np.arange(10) < 7
    task = np.array([0, 0, 0, 1, 1, 2, 2, 3, 3, 3])
    tag, taw, count = metrics.per_class_correct(jnp.asarray(logits), jnp.asarray(labels),
                                                jnp.asarray(valid), jnp.asarray(seen),
                                                jnp.asarray(task))
    exp_tag, exp_taw, exp_count = np.zeros(10, int), np.zeros(10, int), np.zeros(10, int)
    for z, y, v in zip(logits, labels, valid):
      if not v:
        continue
      exp_count[y] += 1
      exp_tag[y] += int(np.argmax(np.where(seen, z, -np.inf)) == y)
      exp_taw[y] += int(np.argmax(np.where(task == task[y], z, -np.inf)) == y)
    np.testing.assert_array_equal(tag, exp_tag)
    np.testing.assert_array_equal(taw, exp_taw)
    np.testing.assert_array_equal(count, exp_count)
    # TAw is never worse than TAg, and both are bounded by the count.
    self.assertTrue(np.all(exp_tag <= exp_taw) and np.all(exp_taw <= exp_count))
    self.assertTrue(math.isclose(float(np.sum(count)), float(valid.sum())))


if __name__ == "__main__":
  absltest.main()
