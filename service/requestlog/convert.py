"""Records -> what the request log's store writes: a batch's table, column by column, or rows record by record.

``Converter`` runs in the conversion process (service.requestlog.process) or, with ``convert="thread"``, in
the log's writer thread. A requests batch is built column by column (service.requestlog.columns); a batch
that path cannot take (a record that does not parse, say) is converted record by record instead
(service.requestlog.rows, the reference), each unreadable record logged and skipped.

``convert_guarded`` is the way a batch that stalled the conversion process is written again: record by
record, telling ``at`` which record it is on (so the gateway can name the one that stalls), with the text
of the records in ``withheld`` dropped, never stored unscrubbed.
"""

from __future__ import annotations

import logging
import marshal
import mmap
from collections.abc import Callable, Collection
from typing import Any, Protocol, runtime_checkable

from loragate.common.logschema import REQUESTS
from loragate.service.requestlog.queue import batch_count
from loragate.service.requestlog.records import FeedbackRecord, RequestRecord, TextMode, as_record
from loragate.service.requestlog.rows import feedback_row, request_row

log = logging.getLogger("loragate.requestlog")

# Distinct texts -> the same texts scrubbed, in order (loragate.service.requestlog.scrub.scrub_many by default).
ScrubTexts = Callable[[list[str]], list[str]]


@runtime_checkable
class Store(Protocol):
    def write(self, table: str, rows: Any) -> int:
        """Write ``rows`` of ``table`` ("requests" or "feedback") durably: a pa.Table in the table's schema
        (the requests, service.requestlog.columns) or a list of row dicts; returns the files written."""


def default_scrub_texts(texts: list[str]) -> list[str]:
    from loragate.service.requestlog.scrub import scrub_many  # pyarrow: only where the store is

    return scrub_many(texts)


class Converter:
    """Records -> a table (or rows) for the store; ``scrub_texts`` scrubs text in "scrubbed" mode."""

    def __init__(self, text_mode: TextMode, scrub_texts: ScrubTexts | None = None) -> None:
        self.text_mode = text_mode
        self._scrub_texts = scrub_texts or default_scrub_texts

    def warm_up(self) -> None:
        """Imports and compiles what converting takes (pyarrow's kernels, the scrubber's rules) before the first
        batch, so that a batch's time bound (service.requestlog.sink) measures converting, not starting."""
        from loragate.service.requestlog.columns import requests_table
        from loragate.service.requestlog.records import RequestRecord

        record = RequestRecord(
            request_id="warm-up",
            timestamp=0.0,
            route="r",
            variant="v",
            endpoint="chat/completions",
            status=200,
            stream=False,
            fallback=None,
            latency_s=0.0,
            ttft_s=None,
            prompt_tokens=0,
            completion_tokens=0,
            cost_usd=0.0,
            reference_cost_usd=0.0,
            payload=b'{"messages":[{"role":"user","content":"mail me at a@b.example"}]}',
            answer=b'{"choices":[{"message":{"content":"ok"},"finish_reason":"stop"}]}',
        )
        requests_table([record], self.text_mode, self._clean_all)

    def write(self, store: Store, table: str, records: list[tuple]) -> tuple[int, int]:
        """(rows written, records unreadable); a store error propagates (the caller retries)."""
        return _stored(store, table, *self.convert(table, records))

    def write_batch(self, store: Store, table: str, batch: bytes | mmap.mmap) -> tuple[int, int]:
        """``write`` for a batch as it crossed (the marshalled list of its records, service.requestlog.queue)."""
        batch_count(batch)  # a corrupt count is refused before marshal reserves room for it
        return _stored(store, table, *self.convert(table, marshal.loads(batch)))

    def convert(self, table: str, records: list[tuple]) -> tuple[Any, int]:
        """(a pa.Table or a list of row dicts, records unreadable).

        ``records`` are RequestRecords or FeedbackRecords, or the plain tuples a batch unmarshals to.
        """
        if table == REQUESTS and records:
            from loragate.service.requestlog.columns import requests_table  # pyarrow: where the store is

            try:
                return requests_table(records, self.text_mode, self._clean_all), 0
            except Exception as exc:  # one odd record: the batch goes record by record, skipping the unreadable
                log.debug("request log: a batch converted record by record (%s: %s)", type(exc).__name__, exc)
        return self._rows(table, records, (), lambda index: None)

    def convert_guarded(
        self, table: str, records: list[tuple], withheld: Collection[int], at: Callable[[int], None]
    ) -> tuple[list[dict[str, Any]], int]:
        """Rows record by record (the reference), ``at(index)`` called before each; the records at the indices
        in ``withheld`` keep no text. (rows, records unreadable)."""
        return self._rows(table, records, withheld, at)

    def _rows(
        self, table: str, records: list[tuple], withheld: Collection[int], at: Callable[[int], None]
    ) -> tuple[list[dict[str, Any]], int]:
        rows, unreadable = [], 0
        for index, fields in enumerate(records):
            at(index)
            mode: TextMode = "none" if index in withheld else self.text_mode
            try:
                if table == REQUESTS:
                    rows.append(request_row(as_record(RequestRecord, fields), mode, self._scrub))
                else:
                    rows.append(feedback_row(as_record(FeedbackRecord, fields), mode, self._scrub))
            except Exception:  # a record we cannot read must not cost the batch
                log.exception("request log: cannot convert a %s record", table)
                unreadable += 1
        return rows, unreadable

    def _clean_all(self, texts: list[str]) -> dict[str, str]:
        """Distinct texts -> scrubbed, all in one call. No cache across batches: a batch holds each distinct text
        once already, and a text that recurs in every batch (a system prompt) costs one scrub a batch."""
        return dict(zip(texts, self._scrub_texts(texts)))

    def _scrub(self, text: str) -> str:
        return self._scrub_texts([text])[0]


def _stored(store: Store, table: str, data: Any, unreadable: int) -> tuple[int, int]:
    """Writes the converted rows (if any): (rows written, records unreadable)."""
    if len(data):
        store.write(table, data)
    return len(data), unreadable
