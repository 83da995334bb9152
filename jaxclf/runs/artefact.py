"""An exported model loaded back behind the interface of a trained run: `load_artefact(PATH)`.

`jaxclf.export` writes an artefact (StableHLO, ONNX, TFLite, their int8) and `PATH.json` beside it; the
sidecar records the run's config, class names and input contract. `load_artefact` returns an
`Artefact` that stands in for `inference.TrainedModel` wherever a tool only runs the model
(`class_names`, `logits`, `load_image` through the run's eval preprocessing, `input_size`,
`step`), so `jaxclf.evaluate --artefact PATH` and a server reuse everything else. StableHLO runs
through `jax.export.deserialize`, ONNX through onnxruntime (the `onnx` extra), TFLite through the
LiteRT interpreter (ai-edge-litert, the `litert` extra), on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from jaxclf import config as config_lib
from jaxclf.runs import inference

SIDECAR_SUFFIX = ".json"
FORMATS = ("stablehlo", "onnx", "tflite")


class Artefact(inference.LoadedModel):
    """An exported model: its runner, and what its sidecar says about it (the run, the input contract)."""

    def __init__(self, path: str, record: dict, config: ml_collections.ConfigDict, run: Callable[[np.ndarray], np.ndarray]):
        self.path = os.path.abspath(path)
        self.record = record
        self.workdir = record.get("workdir", "")
        self.config = config
        self.class_names = tuple(record["class_names"])
        self.step = int(record.get("checkpoint_step") or 0)
        self.weights = record.get("weights", "")
        self._run = run

    @property
    def model_name(self) -> str:
        return self.record.get("model_name", self.config.model_name)

    @property
    def format(self) -> str:
        """"stablehlo", "onnx", "onnx-int8", "tflite" or "tflite-int8"."""
        return self.record["format"] + ("-int8" if self.record.get("quantization") else "")

    @property
    def provenance(self) -> dict:
        """The artefact file, the run and checkpoint it was exported from, and how it was quantized."""
        return {"artefact": self.path, "workdir": self.record.get("workdir", ""),
                "checkpoint_step": self.step, "weights": self.weights,
                "quantization": self.record.get("quantization")}

    def eval_dir(self, split_name: str) -> str:
        """Where `jaxclf.evaluate --artefact` writes the reports of `split_name`: PATH.eval/<split>."""
        return os.path.join(self.path + ".eval", split_name)

    def input_size(self) -> tuple[int, int]:
        """(height, width) the artefact takes: fixed when it was exported."""
        _, height, width, _ = self.record["input"]["shape"]
        return int(height), int(width)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """uint8[B, H, W, 3] images after the eval preprocessing -> float32[B, C] logits."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (*self.input_size(), 3) or images.dtype != np.uint8:
            raise inference.WorkdirError(
                f"{self.path} takes uint8[B, {', '.join(map(str, self.input_size()))}, 3] images; "
                f"got {images.dtype}{list(images.shape)}")
        return np.asarray(self._run(np.ascontiguousarray(images)), np.float32)

    @property
    def _config_path(self) -> str:
        return self.path + SIDECAR_SUFFIX


def load_artefact(path: str) -> Artefact:
    """The artefact at `path` with its sidecar `path.json`, ready to run on this machine's CPU (or the
    platform a StableHLO artefact was lowered for). Raises inference.WorkdirError naming the file."""
    record = read_sidecar(path)
    with open(path, "rb") as f:
        data = f.read()
    if record["format"] == "stablehlo":
        run = stablehlo_runner(data, path, record.get("platforms"))
    elif record["format"] == "tflite":
        run = tflite_runner(data)
    else:
        run = onnx_runner(data)
    return Artefact(path, record, _run_config(record, path), run)


def read_sidecar(path: str) -> dict:
    """The sidecar of the artefact at `path`, checked to name a known format."""
    if not os.path.isfile(path):
        raise inference.WorkdirError(f"--artefact {path}: no such file")
    sidecar = path + SIDECAR_SUFFIX
    try:
        with open(sidecar) as f:
            record = json.load(f)
    except FileNotFoundError:
        raise inference.WorkdirError(f"{sidecar} does not exist: an artefact needs the sidecar jaxclf.export writes "
                                     "beside it (class names, input size, preprocessing)") from None
    except json.JSONDecodeError as e:
        raise inference.WorkdirError(f"{sidecar} is not valid JSON ({e})") from None
    if record.get("format") not in FORMATS or "class_names" not in record or "input" not in record:
        raise inference.WorkdirError(f"{sidecar} is not a jaxclf.export sidecar (format one of {FORMATS}, "
                                     "class_names and input expected)")
    return record


def _run_config(record: dict, path: str) -> ml_collections.ConfigDict:
    """The run's config as the sidecar recorded it (older sidecars: the workdir's config.json)."""
    if "run_config" in record:
        config = config_lib.base_config()
        config.update(ml_collections.ConfigDict(record["run_config"]))
        return config
    workdir = record.get("workdir", "")
    if workdir and os.path.isfile(os.path.join(workdir, "config.json")):
        return inference.load_config(workdir)
    raise inference.WorkdirError(f"{path}{SIDECAR_SUFFIX} records no run_config and its workdir {workdir!r} has no "
                                 "config.json; export the artefact again")


def stablehlo_runner(data: bytes, path: str = "", platforms: list[str] | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A function running a serialized `jax.export` artefact on a batch of images (compiled once per batch size)."""
    here = jax.export.default_export_platform()
    if platforms and here not in platforms:
        raise inference.WorkdirError(f"{path} was lowered for {platforms}, not for this machine's {here}; "
                                     f"export it again with --platforms {here}")
    exported = jax.export.deserialize(bytearray(data))
    call = jax.jit(exported.call)
    return lambda images: np.asarray(call(images))


def onnx_runner(data: bytes) -> Callable[[np.ndarray], np.ndarray]:
    """A function running an ONNX model with onnxruntime on the CPU on a batch of images."""
    try:
        import onnxruntime
    except ImportError:
        raise inference.WorkdirError("running an ONNX artefact needs onnxruntime: pip install -e '.[onnx]'") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # onnxruntime's warnings about unused initializers are not the user's concern
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return lambda images: session.run(None, {input_name: images})[0]


def tflite_runner(data: bytes, num_threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A function running a LiteRT model on a batch of images, one model batch (fixed when exported) at a time.

    Integer logits of a full-integer model come back dequantized with the output's scale and zero point.
    One interpreter, behind a lock: LiteRT interpreters must not be invoked from two threads at once.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise inference.WorkdirError("running a TFLite artefact needs ai-edge-litert: pip install -e '.[litert]'") from None
    interpreter = Interpreter(model_content=data, num_threads=num_threads)
    interpreter.allocate_tensors()
    model_input, output = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    batch = int(model_input["shape"][0])
    scale, zero_point = output["quantization"] if np.issubdtype(output["dtype"], np.integer) else (1.0, 0)
    lock = threading.Lock()

    def run(images: np.ndarray) -> np.ndarray:
        if len(images) % batch:
            raise inference.WorkdirError(f"this TFLite model takes batches of {batch} images; got {len(images)}")
        logits = []
        with lock:
            for start in range(0, len(images), batch):
                interpreter.set_tensor(model_input["index"], images[start : start + batch])
                interpreter.invoke()
                logits.append(interpreter.get_tensor(output["index"]))
        return (np.concatenate(logits).astype(np.float32) - zero_point) * np.float32(scale)

    return run


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The run flags (`inference.add_run_arguments`) and `--artefact`, its alternative."""
    inference.add_run_arguments(parser, workdir_required=False)
    parser.add_argument("--artefact", default="", metavar="PATH",
                        help="an exported model (stablehlo, onnx or tflite, with PATH.json) instead of --workdir")


def load_from_args(args: argparse.Namespace) -> inference.LoadedModel:
    """The model the flags of `add_model_arguments` name: the artefact, or the run's checkpoint."""
    if bool(args.artefact) == bool(args.workdir):
        raise inference.WorkdirError("give either --workdir (a training run) or --artefact (an exported model)")
    if args.artefact:
        return load_artefact(args.artefact)
    return inference.load_from_args(args)
