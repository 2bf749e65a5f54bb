"""parse_classes forms and errors; ClassSubset keeps order, labels, ids and forwards the transform."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from compatembed.data import ClassSubset, SyntheticImages, parse_classes
from compatembed.errors import DataError

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, None),
        ("all", None),
        (" ALL ", None),
        ([3, 1, 1, 2], [1, 2, 3]),
        (("cat", 0, "truck"), [0, 3, 9]),
        ([np.int64(4)], [4]),
        ("0-4", [0, 1, 2, 3, 4]),
        ("0,1,2", [0, 1, 2]),
        (" 7 , 2-3 ,bird ", [2, 3, 7]),
        ("dog", [5]),
        ("5-5", [5]),
        ({"start": 2, "stop": 5}, [2, 3, 4]),
        ({"stop": 2}, [0, 1]),
        ({"start": 0, "stop": 10, "step": 3}, [0, 3, 6, 9]),
        (6, [6]),
        (OmegaConf.create([0, "ship"]), [0, 8]),
        (OmegaConf.create({"start": 8, "stop": 10}), [8, 9]),
    ],
)
def test_parse_classes_forms(spec: object, expected: list[int] | None) -> None:
    assert parse_classes(spec, NAMES) == expected


def test_parse_classes_range_matches_python_range() -> None:
    for start in range(10):
        for stop in range(start + 1, 11):
            assert parse_classes({"start": start, "stop": stop}, NAMES) == list(range(start, stop))
            assert parse_classes(f"{start}-{stop - 1}", NAMES) == list(range(start, stop))


def test_parse_classes_name_wins_over_number() -> None:
    numeric = ["1", "10", "2"]  # ImageFolder folders named by numbers, sorted as strings
    assert parse_classes("2", numeric) == [2]
    assert parse_classes(["10"], numeric) == [1]
    assert parse_classes([2], numeric) == [2]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([10], r"class id 10 out of range .*valid ids 0-9"),
        ("0-10", r"class id 10 out of range"),
        ("4-2", r"empty class range '4-2'"),
        ("unicorn", r"unknown class 'unicorn' .*names: airplane"),
        (["cat", "kitten"], r"unknown class 'kitten'"),
        ({"start": 3, "stop": 3}, r"selects no class"),
        ({"start": 0, "stop": 12}, r"class id 10 out of range"),
        ({"begin": 0, "stop": 2}, r"needs keys start"),
        ({"start": 0, "stop": 2.5}, r"integer start, stop"),
        ([], r"selects no class"),
        ("1,,2", r"empty item"),
        ([True], r"boolean"),
        ([1.0], r"holds 1.0 \(float\)"),
        (-1, r"class id -1 out of range"),
    ],
)
def test_parse_classes_errors(spec: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_classes(spec, NAMES)


@pytest.fixture
def base() -> SyntheticImages:
    return SyntheticImages(num_classes=6, per_class=4, image_size=8)


def test_subset_preserves_labels_order_and_ids(base: SyntheticImages) -> None:
    sub = ClassSubset(base, [4, 1])
    assert sub.selected_classes == [1, 4] and sub.classes == base.classes
    expected = [i for i in range(len(base)) if base.targets[i] in (1, 4)]  # brute force
    assert sub.indices.tolist() == expected and sub.ids.tolist() == expected
    assert sub.targets.tolist() == [1] * 4 + [4] * 4
    for j, i in enumerate(expected):
        img, label = sub[j]
        assert label == base.targets[i] and np.array_equal(np.asarray(img), base.data[i])


def test_subset_of_subset_keeps_full_ids(base: SyntheticImages) -> None:
    outer = ClassSubset(ClassSubset(base, "1-4"), ["class2", 4])
    assert outer.selected_classes == [2, 4]
    assert outer.ids.tolist() == [i for i in range(len(base)) if base.targets[i] in (2, 4)]
    assert np.array_equal(outer.targets, base.targets[outer.ids])


def test_subset_all_and_transform_forwarding(base: SyntheticImages) -> None:
    sub = ClassSubset(base, None)
    assert len(sub) == len(base) and sub.selected_classes == list(range(6))
    sub.transform = np.asarray
    assert base.transform is np.asarray and sub.transform is np.asarray
    x, _ = sub[0]
    assert isinstance(x, np.ndarray) and x.shape == (8, 8, 3)


def test_subset_errors(base: SyntheticImages) -> None:
    with pytest.raises(DataError, match=r"class id 6 out of range .*valid ids 0-5"):
        ClassSubset(base, [0, 6])
    with pytest.raises(DataError, match=r"unknown class 'class9' .*names: class0, class1"):
        ClassSubset(base, ["class9"])


def test_per_class_keeps_the_first_items_of_each_class_in_order():
    from compatembed.data import SyntheticImages

    base = SyntheticImages(num_classes=4, per_class=6, seed=3)
    subset = ClassSubset(base, [1, 3], per_class=2)
    expected = [i for c in (1, 3) for i in [j for j, t in enumerate(base.targets) if t == c][:2]]
    assert sorted(subset.indices.tolist()) == sorted(expected)
    assert subset.indices.tolist() == sorted(subset.indices.tolist())  # dataset order kept
    assert np.bincount(subset.targets, minlength=4).tolist() == [0, 2, 0, 2]
    assert len(ClassSubset(base, None, per_class=100)) == len(base)
    with pytest.raises(DataError, match="per_class must be positive"):
        ClassSubset(base, None, per_class=0)
