"""What the hot loop leaves out stays out of the results: training metrics only on logging steps, no
host-device sync in a step that does not log (CUDA only), and TensorBoard written without importing its writer."""

import copy
import csv
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_config, run, run_dirs
from logger.tensorboard import TensorboardWriter, flatten, masked_crc32c
from model import metric
from trainer.trainer import MetricTracker
from utils import checkpoint

ENV = {"OMP_NUM_THREADS": "1"}


def batch(correct: int) -> dict:
    """Two samples, `correct` of them classified right; loss 0.5."""
    output = torch.tensor([[2.0, 1.0], [0.0, 1.0]])
    return {"loss": torch.tensor(0.5), "output": output, "target": torch.tensor([0, 1 if correct == 2 else 0])}


@pytest.mark.quick
def test_metrics_average_the_measured_batches_and_a_mid_epoch_state_keeps_their_count():
    tracker = MetricTracker({"accuracy": metric.accuracy}, torch.device("cpu"))
    tracker.update(batch(1), 2, measure=False)  # not measured: its accuracy (0.5) counts nowhere
    tracker.update(batch(2), 2)
    resumed = MetricTracker({"accuracy": metric.accuracy}, torch.device("cpu"))
    resumed.load_state_dict(copy.deepcopy(tracker.state_dict()))  # as through a file: no shared tensors
    for t in (tracker, resumed):
        t.update(batch(1), 2, measure=False)
        t.update(batch(1), 2)
    assert resumed.result() == tracker.result() == {"loss": 0.5, "accuracy": 0.75}


@pytest.mark.quick
def test_a_trackers_state_is_a_copy_that_later_batches_leave_alone():
    tracker = MetricTracker({"accuracy": metric.accuracy}, torch.device("cpu"))
    tracker.update(batch(2), 2)
    state = tracker.state_dict()
    saved = state["ranks"][0]["sums"].clone()
    tracker.update(batch(1), 2)
    assert torch.equal(state["ranks"][0]["sums"], saved)


@pytest.mark.quick
def test_the_nan_check_reads_the_running_sum_and_names_the_first_bad_batch():
    """A check reads only the loss's running sum when it is finite; when it is not, the batches since the last
    check name the first bad one. A sum that overflowed from finite losses is not a NaN loss."""
    tracker = MetricTracker({}, torch.device("cpu"))
    huge = {"loss": torch.tensor(3e38)}
    for result in (batch(2), huge, huge):
        tracker.update(result, 2)
    assert tracker.interval_result()["loss"] == float("inf") and tracker.first_nonfinite() is None
    for loss in (1.0, float("nan"), float("inf")):
        tracker.update({"loss": torch.tensor(loss)}, 2)
    assert tracker.first_nonfinite() == 4  # the epoch's batches 0-2, then 3 (finite) and 4 (NaN)
    assert tracker.first_nonfinite() is None  # nothing since


def test_training_metrics_on_logging_steps_only_leave_the_weights_and_losses_as_on_every_step(tmp_path, tiny_mnist):
    runs = {}
    for mode in ("log_steps", "every_step"):
        (tmp_path / mode).mkdir()
        config = make_config(tmp_path / mode, tiny_mnist, {"trainer.epochs": 1, "trainer.log_step": 5,
                                                            "trainer.train_metrics": mode,
                                                            "trainer.tensorboard": False})
        result = run("train.py", "-c", config, env=ENV)
        assert result.returncode == 0, result.stderr
        (runs[mode],) = run_dirs(tmp_path / mode / "saved")
    final = {mode: checkpoint.load(run_dir / "latest.pth") for mode, run_dir in runs.items()}
    for key, value in final["every_step"]["model"].items():
        assert torch.equal(final["log_steps"]["model"][key], value), key
    rows = {mode: next(csv.DictReader(open(run_dir / "metrics.csv"))) for mode, run_dir in runs.items()}
    assert rows["log_steps"]["loss"] == rows["every_step"]["loss"]
    assert rows["log_steps"]["val_accuracy"] == rows["every_step"]["val_accuracy"]
    assert rows["log_steps"]["accuracy"] != rows["every_step"]["accuracy"]  # 6 of 28 batches against all


@pytest.mark.quick
def test_event_records_carry_tensorboards_own_checksum():
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tensorboards

    for data in (b"", b"123456789", bytes(range(256)) * 3, os.urandom(1000)):
        assert masked_crc32c(data) == tensorboards(data)


@pytest.mark.quick
def test_the_writers_records_are_the_events_tensorboard_reads(tmp_path):
    """Encoded by hand (logger/tensorboard.py), read back by TensorBoard's loader and protocol buffers, and the
    HParams view's data equal to what torch.utils.tensorboard's add_hparams builds."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2
    from torch.utils.tensorboard.summary import hparams

    config, final = {"optimizer": {"lr": 0.1, "type": "Adam"}, "amp": False}, {"val_accuracy": 0.9}
    writer = TensorboardWriter(tmp_path, True, purge_step=3)
    writer.scalars({"step/loss": 0.5, "step/huge": 1e39}, 4)
    writer.hparams(config, final)
    writer.close()
    (path,) = tmp_path.iterdir()
    events = list(LegacyEventFileLoader(str(path)).Load())
    assert events[0].file_version == "brain.Event:2"
    assert events[1].step == 3 and events[1].session_log.status == events[1].session_log.START
    assert events[2].step == 4 and [(v.tag, v.simple_value) for v in events[2].summary.value] == \
        [("step/loss", 0.5), ("step/huge", float("inf"))]
    expected = hparams(flatten(config), {"hparam/val_accuracy": 0.9})
    for event, summary in zip(events[3:6], expected):
        (ours,), (theirs,) = event.summary.value, summary.value
        assert ours.tag == theirs.tag and ours.metadata.plugin_data.plugin_name == "hparams"
        assert plugin_data_pb2.HParamsPluginData.FromString(ours.metadata.plugin_data.content) == \
            plugin_data_pb2.HParamsPluginData.FromString(theirs.metadata.plugin_data.content)
    assert [(v.tag, round(v.simple_value, 6)) for v in events[6].summary.value] == [("hparam/val_accuracy", 0.9)]


def test_a_run_writes_its_scalars_and_hparams_without_importing_tensorboard_or_protobuf(tmp_path, tiny_mnist):
    """The import of torch.utils.tensorboard (and boto3 where installed) was the largest once-per-run cost, and the
    protocol-buffer runtime the next."""
    config = make_config(tmp_path, tiny_mnist, {"trainer.epochs": 1, "trainer.log_step": 5})
    driver = (f"import sys, train; train.main(['-c', {str(config)!r}]); "
              "print(sorted(m for m in sys.modules if m.startswith(('torch.utils.tensorboard', 'tensorboard', "
              "'google.protobuf', 'boto3'))))")
    result = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CI": "true", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = run_dirs(tmp_path / "saved")
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    steps = [event.step for event in events.Scalars("step/loss")]
    assert steps[:5] == [5, 10, 15, 20, 25] and steps == sorted(set(steps))
    assert {"epoch/val_accuracy", "epoch/lr", "hparam/val_accuracy"} <= set(events.Tags()["scalars"])
    assert set(events.PluginTagToContent("hparams")) == {"_hparams_/experiment", "_hparams_/session_start_info",
                                                          "_hparams_/session_end_info"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("options", [{}, {"trainer.amp": "bf16", "trainer.channels_last": True}])
def test_a_training_step_that_does_not_log_makes_no_host_device_sync(tmp_path, tiny_mnist, options):
    config = make_config(tmp_path, tiny_mnist, {"device": "cuda", "trainer.type": "tests.nosync.NoSyncTrainer",
                                                "trainer.epochs": 1, "trainer.log_step": 1000, **options})
    result = run("train.py", "-c", config)
    assert result.returncode == 0, result.stderr  # a sync in a checked step is an error, and the run fails
    assert "steps checked for syncs: 26" in result.stdout  # 28 steps, less the first and the last
