"""TensorBoard event files, scalars only, written without TensorFlow or TensorBoard installed.

An event file is a sequence of TFRecords: uint64 length, uint32 masked CRC32C of the length,
the bytes of one `tensorflow.Event` protocol buffer, uint32 masked CRC32C of those bytes. The
first event holds `file_version: "brain.Event:2"`; each later one a step, a wall time and a
`Summary` whose values carry `simple_value` scalars. The few protobuf fields needed are encoded
by hand below (field numbers from tensorflow/core/util/event.proto and framework/summary.proto).
"""

from __future__ import annotations

import os
import socket
import struct
import time

_CRC32C_POLY = 0x82F63B78  # Castagnoli, bit-reversed


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC32C_POLY if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, as TFRecord framing uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 bits and add a constant (mod 2**32)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # negative int64 values encode as 10-byte two's complement
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def encode_event(wall_time: float, step: int | None = None, *, file_version: str | None = None,
                 scalars: dict[str, float] | None = None) -> bytes:
    """One `Event` message: wall_time (1, double), step (2, int64), file_version (3, string), summary (5)."""
    message = _field(1, 1, struct.pack("<d", wall_time))
    if step is not None:
        message += _field(2, 0, _varint(int(step)))
    if file_version is not None:
        message += _length_delimited(3, file_version.encode())
    if scalars:
        # Summary.value (1): Value{tag (1, string), simple_value (2, float)}.
        values = b"".join(
            _length_delimited(1, _length_delimited(1, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
            for tag, value in scalars.items()
        )
        message += _length_delimited(5, values)
    return message


def encode_record(data: bytes) -> bytes:
    """TFRecord framing of `data`."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


class EventWriter:
    """Appends scalar events to `logdir/events.out.tfevents.<time>.<host>.<pid>` (created on first write)."""

    def __init__(self, logdir: str):
        self.path = os.path.join(logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}")

    def add_scalars(self, step: int, scalars: dict[str, float], wall_time: float | None = None) -> None:
        """Record `scalars` (tag -> value) at `step`; the file is flushed and closed after each call."""
        records = b""
        if not os.path.exists(self.path):
            records += encode_record(encode_event(time.time(), file_version="brain.Event:2"))
        event = encode_event(time.time() if wall_time is None else wall_time, step,
                             scalars={tag: float(value) for tag, value in scalars.items()})
        with open(self.path, "ab") as f:
            f.write(records + encode_record(event))
