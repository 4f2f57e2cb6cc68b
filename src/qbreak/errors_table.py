"""The per-example quantization error e(x) = NLL_q(x) − NLL_fp(x), for every method, in one tidy table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from qbreak.errors import QbreakError
from qbreak.io import ERRORS_SCHEMA


def error_table(fp: pa.Table, quantized: Mapping[str, pa.Table], methods: Mapping[str, Mapping[str, Any]]) -> pa.Table:
    """Long table (example_id, method, ...) of errors; `quantized` maps method name → its NLL table."""
    fp_ids = fp.column("example_id").to_numpy()
    order = np.argsort(fp_ids)
    nll_fp = fp.column("nll").to_numpy()[order]
    parts = []
    for method, table in quantized.items():
        ids = table.column("example_id").to_numpy()
        q_order = np.argsort(ids)
        if not np.array_equal(ids[q_order], fp_ids[order]):
            raise QbreakError(f"NLL table of method '{method}' covers other examples than the FP table")
        entry = methods[method]
        nll_q = table.column("nll").to_numpy()[q_order]
        n = len(ids)
        parts.append(
            pa.table(
                {
                    "example_id": fp_ids[order].astype(np.int32),
                    "model": fp.column("model").to_pylist()[:1] * n,
                    "method": [method] * n,
                    "kind": [entry["kind"]] * n,
                    "family": [entry.get("family", entry["kind"])] * n,
                    "bits": np.full(n, entry["bits"], dtype=np.int32),
                    "group_size": np.full(n, entry["group_size"], dtype=np.int32),
                    "nll_fp": nll_fp,
                    "nll_q": nll_q,
                    "error": nll_q - nll_fp,
                },
                schema=ERRORS_SCHEMA,
            )
        )
    return pa.concat_tables(parts) if parts else ERRORS_SCHEMA.empty_table()
