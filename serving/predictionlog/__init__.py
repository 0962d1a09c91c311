"""The prediction log: a sampled record of every row the engine scores, for drift and
realized-performance reports (the monitoring package reads it back).

    records.py  the record: its fields, the file format (JSON lines) and the stream's (JSON arrays)
    sinks.py    where records go and how they are read back: rotated JSON-lines files, or a capped
                Redis stream shared by every replica; retention for both
    writer.py   the bounded queue and the thread that expands batches into records and writes
                them, off the event loop; drops (queue full, sink down) are counted
"""
