"""The teacher cache: what `pipeline cache-teacher` writes and `pipeline train` reads.

    schema.py      the format: Parquet columns, physical types, manifest fields, how settings are compared
    write.py       cache-teacher: read the inputs, run the teacher once, write shards and the manifest, resume
    read.py        open and verify a cache, read its rows
    inspection.py  `pipeline inspect`: what a cache holds, and the teacher's targets of one example
"""
