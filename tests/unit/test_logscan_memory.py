"""The reader hands back the memory its passes freed (monitoring/logscan.release_memory).

Parquet footers are parsed whole into the C heap (~1 KB a column chunk); parsed in pool threads and freed,
glibc keeps them in the threads' arenas (the 10M-row compacted drift check kept ~0.9 GB through its report).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from loragate.monitoring.logscan import release_memory


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_footers_parsed_in_threads_are_handed_back(tmp_path: Path) -> None:
    path = tmp_path / "many-row-groups.parquet"
    table = pa.table({f"c{i}": pa.array(range(4000)) for i in range(20)})
    pq.write_table(table, path, row_group_size=1)  # 4,000 row groups x 20 columns: ~50 MB parsed

    def parse(_: int) -> int:
        return pq.ParquetFile(path).metadata.num_row_groups

    release_memory()
    before = _rss_mb()
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(parse, range(8))) == [4000] * 8
    held = _rss_mb()
    assert held - before > 20, "freed footers are not kept: nothing for release_memory to hand back"
    release_memory()
    after = _rss_mb()
    assert after - before < 0.25 * (held - before), (before, held, after)
