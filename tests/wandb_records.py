"""Reads W&B's offline run files (`run-<id>.wandb`) back into wandb's own `Record` protobufs.

wandb 0.31 writes them from its Go core and ships no Python reader any more (wandb.sdk.internal.datastore
is gone); the records themselves are wandb's protobufs (wandb.proto.wandb_internal_pb2). The framing is
LevelDB's log format behind a 7-byte header (":W&B", magic 0xBEE1, version 0): 32 KiB blocks of chunks,
each with a CRC-32 (IEEE, seeded with the chunk type), a length and a type (full, first, middle, last).
"""

from __future__ import annotations

import glob
import os
import struct
import zlib

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32768
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str) -> list:
    """Every record of one .wandb file, in order, each chunk's checksum verified."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:len(HEADER)] == HEADER, f"{path}: not a W&B run file"
    records, pending, pos = [], b"", len(HEADER)
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:  # a block's tail too short for a chunk header is zero padding
            pos += left_in_block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        if kind == 0 and length == 0:  # zero padding at the end of a block or of the file
            pos += left_in_block
            continue
        chunk = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f"{path}: bad checksum at byte {pos}"
        pos += CHUNK_HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def run_files(wandb_dir: str) -> list[str]:
    """The .wandb files under `wandb_dir` (a `wandb/` folder), oldest part of a resumed run first."""
    return sorted(glob.glob(os.path.join(wandb_dir, "*run-*", "run-*.wandb")))
