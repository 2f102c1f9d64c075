"""training.splits: stratified, seeded, nested, never overlapping."""

from __future__ import annotations

import numpy as np
import pytest

from training import splits

LABELS = np.array([0] * 20 + [1] * 12 + [2] * 8)
NAMES = ["a", "b", "c"]


def test_split_is_disjoint_stratified_and_seeded() -> None:
    s = splits.make_split(LABELS, 4, 0.25, 0.3, seed=1, class_names=NAMES)
    splits.assert_disjoint(train=s.train, val=s.val, test=s.test)
    counts = s.counts(LABELS, NAMES)["label_counts"]
    assert counts["test"] == {"a": 6, "b": 4, "c": 2}  # round(0.3 * n) per class
    for c in NAMES:  # 4 labels per class: 1 to validation, 3 to training
        assert counts["train"][c] == 3 and counts["val"][c] == 1
    again = splits.make_split(LABELS, 4, 0.25, 0.3, seed=1, class_names=NAMES)
    np.testing.assert_array_equal(s.train, again.train)
    other = splits.make_split(LABELS, 4, 0.25, 0.3, seed=2, class_names=NAMES)
    assert not np.array_equal(s.test, other.test)


def test_test_split_fixed_and_labels_nested_across_k() -> None:
    by_k = {k: splits.make_split(LABELS, k, 0.2, 0.3, seed=5, class_names=NAMES) for k in (1, 2, 4, None)}
    tests = [s.test for s in by_k.values()]
    assert all(np.array_equal(tests[0], t) for t in tests)
    labeled = {k: set(np.concatenate([s.train, s.val]).tolist()) for k, s in by_k.items()}
    assert labeled[1] <= labeled[2] <= labeled[4] <= labeled[None]
    assert by_k[1].val.size == 0 and by_k[1].train.size == 3  # K=1: no validation
    assert by_k[None].train.size + by_k[None].val.size + by_k[None].test.size == LABELS.size


def test_group_split_keeps_groups_on_one_side() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(10), 4)
    labels = rng.permutation(np.tile([0, 1], 20))
    pool, test = splits.stratified_test_split(labels, 0.3, seed=3, groups=groups)
    assert not set(groups[pool]) & set(groups[test])
    assert set(labels[test]) == {0, 1} and set(labels[pool]) == {0, 1}


def test_too_few_images_names_the_class() -> None:
    with pytest.raises(ValueError, match="class 'c' has only 6 image"):
        splits.make_split(LABELS, 8, 0.2, 0.3, seed=0, class_names=NAMES)
    with pytest.raises(ValueError, match="class 'b' has 1 image"):
        splits.make_split(np.array([0, 0, 0, 1]), 1, 0.2, 0.3, seed=0, class_names=["a", "b"])
    with pytest.raises(ValueError, match="'all'"):
        splits.parse_labels_per_class("many")


def test_assert_disjoint_catches_overlap() -> None:
    with pytest.raises(AssertionError, match="train and test overlap"):
        splits.assert_disjoint(train=[1, 2, 3], test=[3, 4])
