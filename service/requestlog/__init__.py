"""The request log: one record per answered request, written off the request path as Parquet.

    gateway (event loop)                             writer thread                  conversion process
    Accounting.account -> RequestRecord ---> queue ---> batch (marshalled) --spool--> convert: columns | rows
                          (records.py)     (queue.py,                  (spool.py,        (convert.py, columns.py,
                                            _logqueue.c)                process.py)       rows.py, _lognative.c,
                                                                                          scrub.py)
                                                                                              |
                                                                                        store.py: Parquet files

- records.py: the one definition of a record's fields (RequestRecord, FeedbackRecord).
- queue.py (+ _logqueue.c): records kept marshalled until their batch.
- sink.py: RequestLog, the queue's bound, the writer thread, retries, the stall watchdog, bounded close.
- process.py: the conversion process, each call bounded in time; it dies with the gateway.
- spool.py: a batch handed over in a memfd instead of the pipe.
- convert.py: a batch -> a table (columns.py, with the JSON reading in _lognative.c) or rows (rows.py, the
  reference every fast path is tested against).
- scrub.py: scrub_many, the batch's distinct texts scrubbed (native rules, else RE2 gates + Python's rules).
- store.py: the Parquet files, local or on an object store.

The gateway imports RequestLog and the records from here; pyarrow is imported only on the conversion side.
"""

from loragate.service.requestlog.convert import Store
from loragate.service.requestlog.records import FeedbackRecord, RequestRecord, TextMode
from loragate.service.requestlog.sink import NullRequestLog, RecentIds, RequestLog, RequestSink, parquet_store

__all__ = [
    "FeedbackRecord",
    "NullRequestLog",
    "RecentIds",
    "RequestLog",
    "RequestRecord",
    "RequestSink",
    "Store",
    "TextMode",
    "parquet_store",
]
