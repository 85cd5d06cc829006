"""Read back what a W&B offline run recorded, from its `run-<id>.wandb` file.

The file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then 32 KiB
blocks of records `<crc32 u32><length u16><type u8><payload>` where type FULL=1, FIRST=2,
MIDDLE=3, LAST=4 lets one payload span blocks. Each payload is a protobuf `Record`.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
RECORD_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_payloads(path: str | Path) -> list[bytes]:
    data = Path(path).read_bytes()
    if not data.startswith(HEADER):
        raise ValueError(f"{path}: not a W&B run file (header {data[:7]!r})")
    payloads, pending, pos = [], b"", len(HEADER)
    while pos + RECORD_HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < RECORD_HEADER:  # the tail of a block too short for a header is padding
            pos += room
            continue
        checksum, length, kind = struct.unpack_from("<IHB", data, pos)
        if length == 0 and kind == 0:  # zero fill at the end of a block
            pos += room
            continue
        chunk = data[pos + RECORD_HEADER : pos + RECORD_HEADER + length]
        if len(chunk) < length:
            break  # a run killed mid-write leaves a torn last record
        if zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF != checksum:
            raise ValueError(f"{path}: bad checksum at byte {pos}")
        pos += RECORD_HEADER + length
        if kind == FULL:
            payloads.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            payloads.append(pending + chunk)
            pending = b""
    return payloads


@dataclass
class OfflineRun:
    run_id: str = ""
    name: str = ""
    project: str = ""
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    exit_code: int | None = None

    def series(self, key: str) -> list:
        return [row[key] for row in self.history if key in row]


def read_run(path: str | Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2

    run = OfflineRun()
    for payload in read_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.name, run.project = record.run.run_id, record.run.display_name, record.run.project
            run.config.update(_items(record.run.config.update))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
            for item in record.summary.remove:
                run.summary.pop(_key(item), None)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def find_run_files(wandb_dir: str | Path) -> list[Path]:
    return sorted(Path(wandb_dir).rglob("run-*.wandb"))


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def _items(items) -> dict:
    out = {}
    for item in items:
        out[_key(item)] = json.loads(item.value_json)
    return out
