"""Per-example results gathered batch by batch, held in a few large arrays.

A model pass appends a handful of values per example (and per layer and site) for every batch.
Kept as one small NumPy array per batch and column, they were thousands of long-lived small
allocations in glibc's heap, each placed among the batch's freed multi-MB activation buffers. They
cut the freed space into holes too small for the next batch's buffers, so the heap grew by a fresh
range with every batch: the compare job's pass (FP + one method, 48 examples) took the heap's
address range from 488 to 1,790 MB over six batches, and the pages that the batches touched
between two trims raised the peak RSS. With one array per column whose capacity doubles, a run
makes O(log n) allocations for its results, and the heap stays at one range (bench/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

_FIRST_CAPACITY = 256


class Columns:
    """Equal-length columns that grow by appended rows; `dtypes` fixes a column's type, the others
    take the type of their first values (assignment casts later values to it, as `astype` does)."""

    def __init__(self, **dtypes: DTypeLike) -> None:
        self._dtypes = {name: np.dtype(dtype) for name, dtype in dtypes.items()}
        self._data: dict[str, np.ndarray] = {}
        self._rows = 0

    def __len__(self) -> int:
        return self._rows

    def append(self, rows: int, values: Mapping[str, ArrayLike]) -> None:
        """Append `rows` rows: each value an array of `rows` values or one value for all of them.
        Every append names the same columns."""
        arrays = {name: np.asarray(value) for name, value in values.items()}
        if self._data and arrays.keys() != self._data.keys():
            raise ValueError(f"columns {sorted(arrays)}, expected {sorted(self._data)}")
        for name, array in arrays.items():
            if array.ndim > 1 or (array.ndim == 1 and len(array) != rows):
                raise ValueError(f"column {name!r}: shape {array.shape} for {rows} rows")
        stop = self._rows + rows
        for name, array in arrays.items():
            column = self._data.get(name)
            if column is None or len(column) < stop:
                column = self._data[name] = self._grown(name, column, array.dtype, stop)
            column[self._rows : stop] = array
        self._rows = stop

    def _grown(self, name: str, column: np.ndarray | None, dtype: np.dtype, rows: int) -> np.ndarray:
        """A larger array for `name` (at least `rows`, at least twice the old), holding the old rows."""
        if column is None:
            return np.empty(max(rows, _FIRST_CAPACITY), dtype=self._dtypes.get(name, dtype))
        grown = np.empty(max(rows, 2 * len(column)), dtype=column.dtype)
        grown[: self._rows] = column[: self._rows]
        return grown

    def __getitem__(self, name: str) -> np.ndarray:
        """The column's rows so far (a read-only view); an empty array of its type before any append."""
        column = self._data.get(name)
        if column is None:
            if self._data:
                raise KeyError(name)
            return np.zeros(0, dtype=self._dtypes.get(name, np.float64))
        view = column[: self._rows]
        view.flags.writeable = False
        return view
