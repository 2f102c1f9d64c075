"""Seeded, stratified train / validation / test splits for few-label experiments.

The order is fixed so that every number reported is on images that training, early stopping and
model selection never saw:

1. a **test split** is drawn first (stratified by class, or by group such as the source tile when
   crops of one tile must not land on both sides), fixed by the seed alone;
2. ``K`` **labeled images per class** are drawn from the rest. Each class's pool is shuffled by the
   seed alone, so the K=2 subset is contained in the K=4 subset and every encoder of a study gets
   exactly the same labeled images;
3. a **validation split** is carved from those labels (at least one per class when a class has two
   or more labels; with one label per class there is no validation split).

:func:`assert_disjoint` is called on every split made here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ALL = "all"


def parse_labels_per_class(value: str | int | None) -> int | None:
    """``"all"``/``None`` -> ``None`` (every available label), else a positive int."""
    if value is None or (isinstance(value, str) and value.strip().lower() == ALL):
        return None
    try:
        k = int(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"labels per class must be a positive integer or 'all', got {value!r}") from exc
    if k < 1:
        raise ValueError(f"labels per class must be >= 1, got {k}")
    return k


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


def _name(class_names: Sequence[str] | None, c: int) -> str:
    return repr(class_names[c]) if class_names is not None and c < len(class_names) else f"#{c}"


def assert_disjoint(**splits: Any) -> None:
    """Raises ``AssertionError`` when any two named index sets share an element."""
    names = list(splits)
    sets = {n: set(np.asarray(splits[n]).ravel().tolist()) for n in names}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            common = sets[a] & sets[b]
            if common:
                raise AssertionError(
                    f"splits {a} and {b} overlap in {len(common)} images, e.g. {sorted(common)[:5]}"
                )


def stratified_test_split(
    labels: Sequence[int] | np.ndarray,
    test_fraction: float,
    seed: int,
    groups: Sequence[Any] | np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    max_attempts: int = 200,
) -> tuple[np.ndarray, np.ndarray]:
    """Splits indices into (pool, test).

    Without ``groups`` each class contributes ``round(test_fraction * n_c)`` images (at least one,
    and at least one is left for training). With ``groups`` whole groups go to the test side until it
    holds ``test_fraction`` of the images; draws are repeated (deterministically) until every class
    appears on both sides.

    Raises:
        ValueError: a class has fewer than 2 images, or no group assignment puts every class on both
            sides.
    """
    y = np.asarray(labels, dtype=np.int64)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test fraction must be in (0, 1), got {test_fraction}")
    classes = np.unique(y)
    for c in classes:
        if (y == c).sum() < 2:
            raise ValueError(
                f"class {_name(class_names, int(c))} has {(y == c).sum()} image(s); "
                "it needs at least 2 (one for the test split, one to learn from)"
            )
    if groups is None:
        test: list[int] = []
        for c in classes:
            idx = np.flatnonzero(y == c)
            idx = idx[_rng(seed, 1, int(c)).permutation(idx.size)]
            n_test = int(np.clip(round(test_fraction * idx.size), 1, idx.size - 1))
            test.extend(idx[:n_test].tolist())
        test_idx = np.sort(np.asarray(test, dtype=np.int64))
    else:
        g = np.asarray([str(v) for v in groups])
        if g.shape != y.shape:
            raise ValueError(f"{g.size} groups for {y.size} labels")
        unique = np.unique(g)
        target = test_fraction * y.size
        test_idx = np.empty(0, dtype=np.int64)
        for attempt in range(max_attempts):
            order = unique[_rng(seed, 2, attempt).permutation(unique.size)]
            chosen: list[str] = []
            count = 0
            for grp in order[:-1]:  # at least one group stays on the training side
                if count >= target:
                    break
                chosen.append(grp)
                count += int((g == grp).sum())
            mask = np.isin(g, chosen)
            if all(np.any(mask & (y == c)) and np.any(~mask & (y == c)) for c in classes):
                test_idx = np.flatnonzero(mask)
                break
        else:
            raise ValueError(
                f"could not split {unique.size} groups so that every class is on both the test and the "
                f"training side (test fraction {test_fraction}); label more groups or change the fraction"
            )
    pool_idx = np.setdiff1d(np.arange(y.size), test_idx)
    assert_disjoint(pool=pool_idx, test=test_idx)
    return pool_idx, test_idx


def sample_labeled(
    labels: Sequence[int] | np.ndarray,
    pool: np.ndarray,
    labels_per_class: int | None,
    seed: int,
    n_classes: int,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Draws ``labels_per_class`` indices of every class from ``pool`` (all of them for ``None``).

    The draw is nested: for a fixed seed the first K of each class's shuffled pool are taken.

    Raises:
        ValueError: naming a class with fewer pool images than requested (or none at all).
    """
    y = np.asarray(labels, dtype=np.int64)
    pool = np.asarray(pool, dtype=np.int64)
    chosen: list[int] = []
    for c in range(n_classes):
        idx = pool[y[pool] == c]
        if idx.size == 0:
            raise ValueError(f"class {_name(class_names, c)} has no images outside the test split")
        idx = idx[_rng(seed, 3, c).permutation(idx.size)]
        if labels_per_class is not None:
            if idx.size < labels_per_class:
                raise ValueError(
                    f"class {_name(class_names, c)} has only {idx.size} image(s) outside the test split, "
                    f"fewer than the {labels_per_class} labels per class requested"
                )
            idx = idx[:labels_per_class]
        chosen.extend(idx.tolist())
    return np.sort(np.asarray(chosen, dtype=np.int64))


def carve_validation(
    labels: Sequence[int] | np.ndarray, labeled: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Splits labeled indices into (train, val), per class.

    A class with ``n >= 2`` labels gives ``max(1, round(val_fraction * n))`` of them (never all) to
    validation; a class with one label gives none. ``val_fraction == 0`` disables validation.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {val_fraction}")
    y = np.asarray(labels, dtype=np.int64)
    labeled = np.asarray(labeled, dtype=np.int64)
    train: list[int] = []
    val: list[int] = []
    for c in np.unique(y[labeled]):
        idx = labeled[y[labeled] == c]
        idx = idx[_rng(seed, 4, int(c)).permutation(idx.size)]
        n_val = 0
        if val_fraction > 0 and idx.size >= 2:
            n_val = int(np.clip(round(val_fraction * idx.size), 1, idx.size - 1))
        val.extend(idx[:n_val].tolist())
        train.extend(idx[n_val:].tolist())
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(val, dtype=np.int64))


@dataclass(frozen=True)
class Split:
    """Index arrays into one dataset. ``val`` may be empty (then selection uses the training loss)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def check(self) -> None:
        assert_disjoint(train=self.train, val=self.val, test=self.test)

    def counts(self, labels: Sequence[int] | np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
        """``{"n_train", "n_val", "n_test", "label_counts": {split: {class: n}}}`` for metrics.json."""
        y = np.asarray(labels, dtype=np.int64)
        out: dict[str, Any] = {
            "n_train": int(self.train.size),
            "n_val": int(self.val.size),
            "n_test": int(self.test.size),
        }
        out["label_counts"] = {
            name: {cls: int((y[idx] == k).sum()) for k, cls in enumerate(class_names)}
            for name, idx in (("train", self.train), ("val", self.val), ("test", self.test))
        }
        return out


def make_split(
    labels: Sequence[int] | np.ndarray,
    labels_per_class: int | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    groups: Sequence[Any] | np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
) -> Split:
    """Test split (fixed by ``seed``), then K labels per class, then validation from those labels."""
    y = np.asarray(labels, dtype=np.int64)
    n_classes = int(y.max()) + 1 if y.size else 0
    if class_names is not None:
        n_classes = len(class_names)
        for c in range(n_classes):
            if not np.any(y == c):
                raise ValueError(f"class {_name(class_names, c)} has no images")
    pool, test = stratified_test_split(y, test_fraction, seed, groups=groups, class_names=class_names)
    labeled = sample_labeled(y, pool, labels_per_class, seed, n_classes, class_names)
    train, val = carve_validation(y, labeled, val_fraction, seed)
    split = Split(train=train, val=val, test=test)
    split.check()
    return split
