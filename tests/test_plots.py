"""TensorBoard event files read back by an independent decoder; training curves and other plots as PNG."""

import glob
import json
import os
import struct

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from PIL import Image

from jaxclf.tracking import plots, tfevents
from jaxclf.tracking.metrics import MetricsWriter


def _event_class():
    """tensorflow.Event, Summary and Summary.Value with the field numbers of TensorFlow's .proto files,
    built with protobuf's own runtime (TensorFlow is not installed)."""
    proto = descriptor_pb2.FileDescriptorProto(name="event_subset.proto", package="tfsubset", syntax="proto3")
    types = descriptor_pb2.FieldDescriptorProto
    value = proto.message_type.add(name="Value")
    value.field.add(name="tag", number=1, type=types.TYPE_STRING, label=types.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=types.TYPE_FLOAT, label=types.LABEL_OPTIONAL)
    summary = proto.message_type.add(name="Summary")
    summary.field.add(name="value", number=1, type=types.TYPE_MESSAGE, type_name=".tfsubset.Value",
                      label=types.LABEL_REPEATED)
    event = proto.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=types.TYPE_DOUBLE, label=types.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=types.TYPE_INT64, label=types.LABEL_OPTIONAL)
    event.field.add(name="file_version", number=3, type=types.TYPE_STRING, label=types.LABEL_OPTIONAL)
    event.field.add(name="summary", number=5, type=types.TYPE_MESSAGE, type_name=".tfsubset.Summary",
                    label=types.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tfsubset.Event"))


def _read_records(path):
    """The payloads of a TFRecord file, checking both masked CRCs of every record."""
    with open(path, "rb") as f:
        data = f.read()
    records, offset = [], 0
    while offset < len(data):
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        payload = data[offset + 12 : offset + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[offset + 12 + length : offset + 16 + length])
        assert header_crc == tfevents.masked_crc32c(header) and payload_crc == tfevents.masked_crc32c(payload)
        records.append(payload)
        offset += 16 + length
    return records


def test_crc32c_matches_published_check_values():
    assert tfevents.crc32c(b"123456789") == 0xE3069283  # the CRC-32C "check" value
    assert tfevents.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720, B.4
    assert tfevents.crc32c(bytes(range(32))) == 0x46DD794E


def test_metrics_writer_writes_tensorboard_scalars(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    writer.write(10, {"train/loss": 2.5, "train/lr": 0.1})
    writer.write(20, {"val/accuracy": 0.75, "val/loss": float("nan")})
    (path,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    event_class = _event_class()
    events = [event_class.FromString(record) for record in _read_records(path)]
    assert events[0].file_version == "brain.Event:2"
    scalars = [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value]
    assert scalars[:3] == [(10, "train/loss", 2.5), (10, "train/lr", pytest.approx(0.1)), (20, "val/accuracy", 0.75)]
    assert scalars[3][:2] == (20, "val/loss") and np.isnan(scalars[3][2])
    assert all(e.wall_time > 1.6e9 for e in events)


def test_training_curves_keep_the_last_value_of_a_repeated_step():
    records = [
        {"step": 5, "train/loss": 2.0, "train/lr": 0.1},
        {"step": 10, "train/loss": 1.5, "train/lr": 0.05},
        {"step": 10, "val/loss": 1.7, "val/accuracy": 0.5},
        {"step": 10, "train/loss": 1.4, "train/lr": 0.05},  # logged again after a resume
    ]
    curves = plots.training_curves(records)
    assert curves["loss"] == {"train/loss": ([5, 10], [2.0, 1.4]), "val/loss": ([10], [1.7])}
    assert curves["accuracy"] == {"val/accuracy": ([10], [0.5])}
    assert curves["lr"] == {"train/lr": ([5, 10], [0.1, 0.05])}


def _drawn(path):
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"), np.float32)
    return image.size, pixels.std()


def test_plots_are_written_as_pngs(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 21):
            f.write(json.dumps({"step": step, "train/loss": 2 / step, "train/accuracy": step / 20, "train/lr": 0.1}) + "\n")
    paths = plots.plot_training_curves(str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["accuracy.png", "loss.png", "lr.png"]
    for path in paths:
        size, spread = _drawn(path)
        assert size == (700, 450) and spread > 5
    path = plots.plot_confusion_matrix(np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]]), ["cat", "dog", "owl"],
                                       str(tmp_path / "cm.png"))
    size, spread = _drawn(path)
    assert size[0] > size[1] and spread > 5  # two panels side by side
    assert plots.plot_training_curves(str(tmp_path / "no_run")) == []
