"""TensorBoard event files, when enabled; otherwise every call does nothing.

The writer encodes TensorBoard's records itself instead of going through `torch.utils.tensorboard.SummaryWriter`:
importing that writer pulls in TensorBoard's summary package (and boto3 where it is installed), and even the
protocol-buffer runtime takes a noticeable part of a short run (benchmarks/README.md). An event file is a sequence
of records (length, its CRC-32C, data, its CRC-32C), each an `Event` protocol buffer
(tensorboard/compat/proto/event.proto and summary.proto; the HParams view's plugins/hparams/api.proto and
plugin_data.proto). The few fields used are encoded below; tests/test_speed.py reads them back with TensorBoard's
own classes. Images and histograms (off by default) are built by torch.utils.tensorboard's summary functions.
"""

import itertools
import math
import os
import socket
import struct
import time
from pathlib import Path

import torch

FILE_NUMBERS = itertools.count()  # two writers of one process never share a file name
# The HParams plugin's names (tensorboard/plugins/hparams/metadata.py); its data version is 0, the default
HPARAMS_PLUGIN = "hparams"
HPARAMS_TAGS = ("_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info")
DATA_TYPE_STRING, DATA_TYPE_FLOAT64, STATUS_SUCCESS, SESSION_START = 1, 3, 1, 1  # the protos' enum values
FLOAT32_MAX = 3.4028234663852886e38


def crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


CRC32C_TABLE = crc32c_table()


def masked_crc32c(data: bytes) -> int:
    """The checksum of TensorBoard's (TFRecord's) records: CRC-32C, rotated and offset ("masked")."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def varint(value: int) -> bytes:
    """Protocol buffers' base-128 integer. A field below is its key, varint(number << 3 | wire type: 0 varint,
    1 double, 2 length-prefixed, 5 float), then its value."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def int_field(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def double_field(number: int, value: float) -> bytes:
    return varint(number << 3 | 1) + struct.pack("<d", value)


def float_field(number: int, value: float) -> bytes:
    """A 32-bit float; beyond its range, +-inf (as protobuf stores it)."""
    value = value if abs(value) <= FLOAT32_MAX or value != value else math.copysign(math.inf, value)
    return varint(number << 3 | 5) + struct.pack("<f", value)


def bytes_field(number: int, value: bytes | str) -> bytes:
    """A string, bytes or an encoded message."""
    data = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | 2) + varint(len(data)) + data


def plugin_value(tag: str, content: bytes) -> bytes:
    """A Summary.Value that only carries the HParams plugin's data (SummaryMetadata.plugin_data)."""
    plugin_data = bytes_field(1, HPARAMS_PLUGIN) + bytes_field(2, content)
    return bytes_field(1, bytes_field(1, tag) + bytes_field(9, bytes_field(1, plugin_data)))


def flatten(config: dict, prefix: str = "") -> dict:
    """A nested config as one level of dotted keys (`trainer.epochs`); lists as their text."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        elif isinstance(value, list):
            flat[f"{prefix}{key}"] = str(value)
    return flat


class TensorboardWriter:
    """One event file in `log_dir`, opened at the first write. `purge_step`: a resumed run hides the points an
    interrupted run logged from that step on (TensorBoard's restart marker)."""

    def __init__(self, log_dir: Path, enabled: bool, purge_step: int | None = None):
        self.log_dir, self.enabled, self.purge_step = log_dir, enabled, purge_step
        self.file = None

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.enabled:  # Summary.value: tag, simple_value
            self._write(step, b"".join(bytes_field(1, bytes_field(1, tag) + float_field(2, value))
                                       for tag, value in values.items()))
            self.file.flush()  # at log intervals and epoch ends: TensorBoard shows the run as it goes

    def image_grid(self, tag: str, images: torch.Tensor, step: int) -> None:
        if self.enabled:
            from torch.utils.tensorboard.summary import image
            from torchvision.utils import make_grid

            grid = make_grid(images[:64].detach().float().cpu(), normalize=True)
            self._write(step, image(tag, grid, dataformats="CHW").SerializeToString())

    def histograms(self, model: torch.nn.Module, step: int) -> None:
        if self.enabled:
            from torch.utils.tensorboard.summary import histogram

            for name, param in model.named_parameters():
                for kind, tensor in (("params", param), ("grads", param.grad)):
                    if tensor is not None:
                        summary = histogram(f"{kind}/{name}", tensor.detach().float().cpu(), "auto")
                        self._write(step, summary.SerializeToString())

    def hparams(self, config: dict, final: dict[str, float]) -> None:
        """The run's config and final metrics, for TensorBoard's HParams view (what SummaryWriter.add_hparams
        writes: the experiment, the session's start with the values and its end, and the metrics as scalars)."""
        if not (self.enabled and final):
            return
        infos, values = [], []
        for name, value in flatten(config).items():
            text = isinstance(value, str)  # anything else (bool included) is a number, as add_hparams has it
            infos.append(bytes_field(4, bytes_field(1, name) + int_field(4, DATA_TYPE_STRING if text else
                                                                            DATA_TYPE_FLOAT64)))
            entry = bytes_field(3, value) if text else double_field(2, value)  # google.protobuf.Value
            values.append(bytes_field(1, bytes_field(1, name) + bytes_field(2, entry)))  # map entry: key, value
        metrics = {f"hparam/{key}": value for key, value in final.items()}
        experiment = b"".join(infos) + b"".join(bytes_field(5, bytes_field(1, bytes_field(2, tag))) for tag in metrics)
        contents = (bytes_field(2, experiment), bytes_field(3, b"".join(values)),  # HParamsPluginData fields
                    bytes_field(4, int_field(1, STATUS_SUCCESS)))
        for tag, content in zip(HPARAMS_TAGS, contents):
            self._write(0, plugin_value(tag, content))
        self.scalars(metrics, 0)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def _write(self, step: int, summary: bytes) -> None:
        """An Event (wall_time, step, summary) after the file's first ones: its version and, when resuming, the
        restart marker (session_log START) at purge_step."""
        if self.file is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            name = f"{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(FILE_NUMBERS)}"
            self.file = open(self.log_dir / f"events.out.tfevents.{name}", "xb")
            self._record(double_field(1, time.time()) + bytes_field(3, "brain.Event:2"))
            if self.purge_step is not None:
                self._record(double_field(1, time.time()) + int_field(2, self.purge_step) +
                             bytes_field(7, int_field(1, SESSION_START)))
        self._record(double_field(1, time.time()) + int_field(2, step) + bytes_field(5, summary))

    def _record(self, data: bytes) -> None:
        """A record: the length (8 bytes), its checksum, the serialised event, its checksum; little-endian."""
        length = struct.pack("<Q", len(data))
        checksums = struct.pack("<I", masked_crc32c(length)), struct.pack("<I", masked_crc32c(data))
        self.file.write(length + checksums[0] + data + checksums[1])
