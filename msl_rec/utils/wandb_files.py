"""Reading a wandb run file (``run-<id>.wandb``) back: its records, as wandb's own protobuf messages.

wandb writes its run file in LevelDB's log format: a 7-byte file header, then records of
<crc32: uint32, length: uint16, type: uint8, data> in 32 KiB blocks (a block's tail shorter than a
record header is zero padding); a protobuf ``Record`` is one FULL record or FIRST, MIDDLE..., LAST.
wandb >= 0.19 reads it only in its Go core, so the reader is here: the report draws training curves
from it, the dashboard tests read an offline run back with it.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

_LOG_BLOCK, _LOG_HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_WANDB_FILE_HEADER = struct.pack("<4sHB", b":W&B", 0xBEE1, 0)


def raw_records(path: str | Path) -> list[bytes]:
    """The serialized ``Record`` messages of a wandb run file, in order. A record cut off at the end (a
    killed run) is dropped; a wrong header or checksum is an error naming the file and byte offset."""
    data = Path(path).read_bytes()
    if data[:_LOG_HEADER] != _WANDB_FILE_HEADER:
        raise ValueError(f"{path}: not a wandb run file (its first bytes are {data[:_LOG_HEADER]!r})")
    records, pending, pos = [], None, _LOG_HEADER
    while pos + _LOG_HEADER <= len(data):
        left = _LOG_BLOCK - pos % _LOG_BLOCK
        if left < _LOG_HEADER:  # padding to the next block
            pos += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos:pos + _LOG_HEADER])
        chunk = data[pos + _LOG_HEADER:pos + _LOG_HEADER + length]
        if len(chunk) < length:
            break  # cut off while being written
        if kind == 0 and length == 0 and checksum == 0:  # zeroed tail of a block
            pos += _LOG_HEADER
            continue
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != checksum:
            raise ValueError(f"{path}: corrupt record at byte {pos} (checksum mismatch); the file was damaged, "
                             "remove the run's wandb folder or restore it")
        pos += _LOG_HEADER + length
        if kind == _FULL:
            records.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind in (_MIDDLE, _LAST) and pending is not None:
            pending += chunk
            if kind == _LAST:
                records.append(pending)
                pending = None
    return records


def read_records(path: str | Path) -> list:
    """Every record of a wandb run file as ``wandb.proto.wandb_internal_pb2.Record``, in order."""
    from wandb.proto.wandb_internal_pb2 import Record

    out = []
    for raw in raw_records(path):
        record = Record()
        record.ParseFromString(raw)
        out.append(record)
    return out


def history(path: str | Path) -> list[dict[str, str]]:
    """The history rows (``wandb.log`` calls) of a wandb run file: ``{key: value}`` with values as text
    (numbers as written, e.g. ``"4.86"``; non-numbers as their JSON)."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            value = json.loads(item.value_json) if item.value_json else None
            row[key] = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else item.value_json
        rows.append(row)
    return rows
