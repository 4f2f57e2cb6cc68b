"""Columns: appended batches read back as their concatenation, across capacity doublings."""

import numpy as np
import pytest

from qbreak.columns import Columns


def test_appends_read_back_as_the_concatenation_of_the_batches() -> None:
    rng = np.random.default_rng(0)
    columns = Columns(example_id=np.int32, site=object)
    batches = []
    for size in [3, 250, 1, 600, 7, 0, 1200]:  # crosses the first capacity (256) and several doublings
        batch = {
            "example_id": rng.integers(0, 2**31 - 1, size, dtype=np.int64),
            "value": rng.standard_normal(size),
            "site": "attn" if size % 2 else "mlp",
        }
        columns.append(size, batch)
        batches.append(batch)
    n = sum(len(b["value"]) for b in batches)
    assert len(columns) == n
    assert columns["example_id"].dtype == np.int32  # fixed type: cast as astype would
    np.testing.assert_array_equal(columns["example_id"], np.concatenate([b["example_id"] for b in batches]))
    assert columns["value"].dtype == np.float64  # the first values' type
    np.testing.assert_array_equal(columns["value"], np.concatenate([b["value"] for b in batches]))
    assert columns["site"].tolist() == [b["site"] for b in batches for _ in range(len(b["value"]))]
    with pytest.raises(ValueError, match="read-only"):
        columns["value"][0] = 1.0


def test_empty_columns_have_their_types() -> None:
    columns = Columns(n=np.int32)
    assert len(columns) == 0
    assert columns["n"].dtype == np.int32 and columns["other"].dtype == np.float64


@pytest.mark.parametrize(
    ("values", "message"),
    [({"a": np.zeros(2)}, r"shape \(2,\) for 3 rows"), ({"a": np.zeros((3, 1))}, "shape"), ({"b": np.zeros(3)}, "expected")],
)
def test_bad_appends_are_refused_and_change_nothing(values: dict, message: str) -> None:
    columns = Columns()
    columns.append(3, {"a": np.arange(3.0)})
    with pytest.raises(ValueError, match=message):
        columns.append(3, values)
    assert len(columns) == 3
    np.testing.assert_array_equal(columns["a"], np.arange(3.0))
