"""Which decoder layers a config setting names: the one rule the jobs (lens, restore, patching) and
the early check before any job (`config.check_layer_settings`) both apply. Torch-free."""

from __future__ import annotations

from collections.abc import Sequence

from qbreak.errors import QbreakError


def check_layers(layers: Sequence[int], n_layers: int, key: str) -> None:
    """QbreakError naming config key `key` unless every layer is in 0..n_layers-1."""
    outside = [layer for layer in layers if not 0 <= layer < n_layers]
    if outside:
        raise QbreakError(f"config key {key}: layer {outside[0]} is not within layers 0..{n_layers - 1}")


def layer_range(entry: Sequence[int], n_layers: int, key: str) -> tuple[int, int]:
    """An inclusive [first, last] range of decoder layers, negative values counting from the end,
    resolved; QbreakError naming config key `key` unless 0 <= first <= last < n_layers."""
    if len(entry) != 2:
        raise QbreakError(f"config key {key}: each range is [first, last], got {list(entry)}")
    first, last = (value + n_layers if value < 0 else value for value in entry)
    if not 0 <= first <= last < n_layers:
        raise QbreakError(f"config key {key}: range {list(entry)} is not within layers 0..{n_layers - 1}")
    return first, last
