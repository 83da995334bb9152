"""Frozen features of a split for the representation evaluators (kNN, few-shot, linear probe).

Each image goes through the eval preprocessing and `pooled_features(forward_features(x))` (the pre-logits
the classifier layer reads), in a function jitted over a batch sharded along the mesh's data axis; the
result is gathered to every host as float32 and put back in the split's order. A `FeatureStore` shared
by a run's evaluators computes the features of a (params, split) once per evaluation round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxclf import config as config_lib
from jaxclf.data import pipeline, sources
from jaxclf.data.normalize import normalize_images
from jaxclf.kernels import xla_cpu
from jaxclf.tracking import progress as progress_lib
from jaxclf.training import sharding


@dataclasses.dataclass(frozen=True)
class SplitFeatures:
    """features: float32[N, D] in the split's order; labels: int32[N]; num_classes: the split's class count."""

    features: np.ndarray
    labels: np.ndarray
    num_classes: int


def make_feature_fn(graphdef: nnx.GraphDef, mesh: Mesh, state_sharding, *, mean: Sequence[float],
                    std: Sequence[float]) -> Callable[[nnx.State, nnx.State, jax.Array], jax.Array]:
    """`fn(params, model_state, images)`: uint8[B, H, W, 3] sharded on `data` -> pooled features float32[B, D],
    replicated (gathered over the mesh, so every host reads the whole batch)."""

    def features(params: nnx.State, model_state: nnx.State, images: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params, model_state)
        pooled = model.pooled_features(model.forward_features(normalize_images(images, mean, std)))
        return pooled.astype(np.float32)

    return jax.jit(features, in_shardings=(state_sharding.params, state_sharding.model_state,
                                           sharding.batch_sharded(mesh)),
                   out_shardings=sharding.replicated(mesh),
                   compiler_options=xla_cpu.compiler_options(mesh.devices.flat[0].platform))


def eval_loader(source: sources.LabelledSource, config) -> pipeline.EvalLoader:
    """An `EvalLoader` of `source` as a resolved config sets evaluation up (pp_eval, eval batch size, workers)."""
    return pipeline.EvalLoader(
        source, config.data.pp_eval, global_batch_size=config.eval_batch_size or config.batch_size,
        num_workers=config.data.num_workers, bad_images=config.data.bad_images,
        max_image_pixels=config.data.max_image_pixels,
    )


class FeatureStore:
    """The features of each split a run's evaluators ask for, computed once per (params, split).

    Entries live while the evaluators are handed the same `model_state` object: one evaluation round
    (a train step makes a new one), so the store holds no features of older weights. Each split's loader
    (and its worker processes) serves every round until `close`.
    """

    def __init__(self, config, mesh: Mesh, graphdef: nnx.GraphDef, state_sharding,
                 splits: dict[str, sources.LabelledSource]):
        self._config, self._mesh, self._splits = config, mesh, splits
        self._fn = make_feature_fn(graphdef, mesh, state_sharding, mean=tuple(config.data.mean),
                                   std=tuple(config.data.std))
        self._model_state = None
        self._entries: list[tuple[nnx.State, str, SplitFeatures]] = []
        self._loaders: dict[str, pipeline.EvalLoader] = {}

    def get(self, split: str, params: nnx.State, model_state: nnx.State) -> SplitFeatures:
        """The features of `split` under `params` and `model_state`."""
        if model_state is not self._model_state:
            self._model_state, self._entries = model_state, []
        for entry_params, entry_split, found in self._entries:
            if entry_params is params and entry_split == split:
                return found
        if split not in self._loaders:
            self._loaders[split] = eval_loader(self._splits[split], self._config)
        try:
            found = extract(self._fn, params, model_state, self._splits[split], self._loaders[split], self._mesh,
                            description=f"features of {split}")
        except NotImplementedError as e:  # a model of the user's own without the Classifier split
            raise config_lib.ConfigError(f"config.evals: the representation evaluators read pooled features; {e}") from None
        self._entries.append((params, split, found))
        return found

    def close(self) -> None:
        """Drop the features and stop the loaders' workers (a later `get` starts them again)."""
        self._model_state, self._entries = None, []
        for loader in self._loaders.values():
            loader.close()


@jax.transfer_guard_device_to_host("allow")
def extract(fn: Callable, params: nnx.State, model_state: nnx.State, source: sources.LabelledSource,
            loader: pipeline.EvalLoader, mesh: Mesh, *, description: str = "features") -> SplitFeatures:
    """`fn`'s features of every image of `source` (one pass of `loader`, an `EvalLoader` of it), in its order."""
    chunks, indices = [], []
    for batch in progress_lib.track(loader.one_pass(), description, total=loader.num_batches):
        # A padding row or a skipped image (mask False) gets index -1.
        batch = {"image": batch["image"], "index": np.where(batch["mask"], batch["index"], -1)}
        global_batch = sharding.shard_batch(batch, mesh)
        chunks.append(fn(params, model_state, global_batch["image"]))
        indices.append(_gathered(global_batch["index"], batch["index"], mesh))
    features = np.concatenate([np.asarray(jax.device_get(c), np.float32) for c in chunks])
    index = np.concatenate(indices)
    kept = index >= 0
    order = np.argsort(index[kept], kind="stable")
    index = index[kept][order]
    return SplitFeatures(features[kept][order], np.asarray(source.labels, np.int32)[index],
                         len(source.class_names))


def _gathered(global_index: jax.Array, local_index: np.ndarray, mesh: Mesh) -> np.ndarray:
    """Every process's row indices of a batch (the local ones on a single process)."""
    if jax.process_count() == 1:
        return np.asarray(local_index)
    return np.asarray(jax.device_get(jax.jit(lambda x: x, out_shardings=sharding.replicated(mesh))(global_index)))
