"""bench/volume_log.py makes the monitor benchmarks' logs: its rows must stay in the current schema (a column
added to the log without the generator broke bench/monitor_volume.py once, and no test noticed)."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc

from bench.volume_log import _file_rows
from loragate.common import logschema


def test_generated_rows_are_in_the_current_schema_with_shadow_copies():
    table = _file_rows(np.random.default_rng(7), 400, 1_762_077_600.0, 1_762_077_610.0, 0.5)
    assert table.schema.equals(logschema.arrow_schema("requests"), check_metadata=False)
    assert pc.all(pc.greater_equal(pc.utf8_length(table["prompt_text"]), 150)).as_py()
    shadow = pc.equal(table["role"], "shadow")
    primaries = table.filter(pc.invert(shadow))
    assert primaries.num_rows == 400 and 0 < table.num_rows - 400 < 60  # ~5% of the v1 rows have a shadow copy
    assert primaries["priority"].null_count == 0 and table.filter(shadow)["priority"].null_count == table.num_rows - 400
    assert table["timestamp"].is_valid().to_pylist() == [True] * table.num_rows
