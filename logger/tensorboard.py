"""TensorBoard event files, when enabled; otherwise every call does nothing.

The writer puts TensorBoard's own protocol buffers (`Event`, `Summary`) into its record format itself instead of
going through `torch.utils.tensorboard.SummaryWriter`: importing that writer pulls in TensorBoard's summary
package, and boto3 where it is installed, a once-per-run cost a short run notices (benchmarks/README.md).
The protocol buffers import quickly. Images and histograms (off by default) are built by
torch.utils.tensorboard's summary functions, imported when first used.
"""

import itertools
import os
import socket
import struct
import time
from pathlib import Path

import torch

FILE_NUMBERS = itertools.count()  # two writers of one process never share a file name
# The HParams plugin's format (tensorboard/plugins/hparams/metadata.py, whose import pulls in the summary package)
HPARAMS_PLUGIN, HPARAMS_VERSION = "hparams", 0
HPARAMS_TAGS = ("_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info")


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
        if self.enabled:
            from tensorboard.compat.proto.summary_pb2 import Summary

            self._write(step, Summary(value=[Summary.Value(tag=tag, simple_value=value)
                                             for tag, value in values.items()]))
            self.file.flush()  # at log intervals and epoch ends: TensorBoard shows the run as it goes

    def image_grid(self, tag: str, images: torch.Tensor, step: int) -> None:
        if self.enabled:
            from torch.utils.tensorboard.summary import image
            from torchvision.utils import make_grid

            grid = make_grid(images[:64].detach().float().cpu(), normalize=True)
            self._write(step, image(tag, grid, dataformats="CHW"))

    def histograms(self, model: torch.nn.Module, step: int) -> None:
        if self.enabled:
            from torch.utils.tensorboard.summary import histogram

            for name, param in model.named_parameters():
                self._write(step, histogram(f"params/{name}", param.detach().float().cpu(), "auto"))
                if param.grad is not None:
                    self._write(step, histogram(f"grads/{name}", param.grad.detach().float().cpu(), "auto"))

    def hparams(self, config: dict, final: dict[str, float]) -> None:
        """The run's config and final metrics, for TensorBoard's HParams view (what SummaryWriter.add_hparams
        writes: the experiment, the session's start with the values and its end, and the metrics as scalars)."""
        if not (self.enabled and final):
            return
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

        start, infos = plugin_data_pb2.SessionStartInfo(), []
        for name, value in flatten(config).items():
            if isinstance(value, str):
                start.hparams[name].string_value = value
            else:
                start.hparams[name].number_value = value
            infos.append(api_pb2.HParamInfo(name=name, type="DATA_TYPE_STRING" if isinstance(value, str) else
                                            "DATA_TYPE_FLOAT64"))
        metrics = {f"hparam/{key}": value for key, value in final.items()}
        experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=[
            api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in metrics])
        end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)
        for tag, content in zip(HPARAMS_TAGS, ({"experiment": experiment}, {"session_start_info": start},
                                               {"session_end_info": end})):
            data = plugin_data_pb2.HParamsPluginData(version=HPARAMS_VERSION, **content).SerializeToString()
            plugin = SummaryMetadata.PluginData(plugin_name=HPARAMS_PLUGIN, content=data)
            self._write(0, Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))]))
        self.scalars(metrics, 0)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def _write(self, step: int, summary) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        if self.file is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            name = f"{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(FILE_NUMBERS)}"
            self.file = open(self.log_dir / f"events.out.tfevents.{name}", "xb")
            self._record(Event(wall_time=time.time(), file_version="brain.Event:2"))
            if self.purge_step is not None:
                self._record(Event(wall_time=time.time(), step=self.purge_step,
                                   session_log=SessionLog(status=SessionLog.START)))
        self._record(Event(wall_time=time.time(), step=step, summary=summary))

    def _record(self, event) -> None:
        """A record: the length (8 bytes), its checksum, the serialised event, its checksum; little-endian."""
        data = event.SerializeToString()
        length = struct.pack("<Q", len(data))
        checksums = struct.pack("<I", masked_crc32c(length)), struct.pack("<I", masked_crc32c(data))
        self.file.write(length + checksums[0] + data + checksums[1])
