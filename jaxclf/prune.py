"""Structured channel pruning of a finished run: `python -m jaxclf.prune --workdir RUN --fraction 0.3 --out RUN2`.

Drops `fraction` of every block's inner channels (ResNet: conv1/conv2 outputs; EfficientNet, MobileNetV3: the
expanded channels of each inverted residual), those whose producing conv filters have the smallest L1 norms,
and writes RUN2: a finished run whose config.json records the narrower widths (`config.model.block_widths`)
and whose checkpoint holds the sliced weights, so `evaluate`, `export` and `serve` read it as any run, and a
fine-tuning run starts from it with `--config.model_init=RUN2` (which recovers the accuracy the cut lost).
Pruning between runs rather than inside one keeps training's shapes fixed and makes the cut exact and checkable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxclf import models, weights
from jaxclf.data import classes
from jaxclf.models import channels
from jaxclf.runs import checkpoint, inference
from jaxclf.training import steps
from jaxclf.weights import workdir as workdir_lib


def channel_pruned(trained: inference.TrainedModel, fraction: float) -> inference.TrainedModel:
    """`trained` rebuilt with `fraction` of its blocks' inner channels sliced away (in memory, no workdir): its
    config records the narrower `model.block_widths` and no EMA (the weights pruned are the ones evaluated)."""
    try:
        widths, values = channels.plan(trained.model, fraction)
    except NotImplementedError as e:
        raise inference.WorkdirError(f"{trained.workdir} ({trained.config.model_name}): {e}") from None
    except ValueError as e:
        raise inference.WorkdirError(f"--fraction: {e}") from None
    config = ml_collections.ConfigDict(trained.config.to_dict())
    with config.unlocked():
        config.model.block_widths = widths
        config.ema_decay = 0.0
    small = models.create_model(config, len(trained.class_names))
    weights.apply(small, values)  # strict: every path present, every shape as the narrower model's
    small.eval()
    return inference.TrainedModel("", config, trained.class_names, small, trained.step, "params")


def prune_run(trained: inference.TrainedModel, fraction: float, out: str) -> dict:
    """Write the channel-pruned copy of `trained` to the new workdir `out`; returns what result.json records."""
    if os.path.exists(out) and os.listdir(out):
        raise inference.WorkdirError(f"--out {out} exists and is not empty: pruning writes a new run")
    small = channel_pruned(trained, fraction)
    count = lambda model: sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    record = {"status": "channel_pruned", "source": os.path.abspath(trained.workdir), "step": trained.step,
              "fraction": fraction, "block_widths": list(small.config.model.block_widths),
              "params_before": count(trained.model), "params_after": count(small.model)}
    write_run(out, small.config, trained.class_names, small.model, trained.step, record)
    return record


def write_run(out: str, config: ml_collections.ConfigDict, class_names: Sequence[str], model: nnx.Module, step: int,
              result: dict) -> None:
    """A finished run in `out` (config.json, classes.json, one checkpoint with `model`'s weights at `step` and no
    optimizer state, result.json holding `result`): what evaluate, export, serve and model_init read."""
    model.eval()
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    with open(os.path.join(out, classes.FILENAME), "w") as f:
        json.dump({"class_names": list(class_names)}, f, indent=2)
    state = steps.TrainState(step=jnp.asarray(step, jnp.int32), params=params, model_state=model_state, opt_state={})
    checkpointer = checkpoint.Checkpointer(out, keep=1)
    checkpointer.save(step, state, checkpoint.IteratorState(b""), {"num_workers": 0})
    checkpointer.close()
    with open(os.path.join(out, workdir_lib.RESULT_FILE), "w") as f:
        json.dump(result, f, indent=2)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; exit status 0, or 2 for a mistake in the arguments or the run (message on stderr)."""
    return inference.run_tool(_run, argv)


def _run(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxclf.prune", description=__doc__.splitlines()[0])
    inference.add_run_arguments(parser)
    parser.add_argument("--fraction", type=float, required=True,
                        help="share of each block's inner channels to drop, in [0, 1)")
    parser.add_argument("--out", required=True, help="the new run's workdir (must not exist or be empty)")
    args = parser.parse_args(argv)
    record = prune_run(inference.load_from_args(args), args.fraction, args.out)
    print(f"wrote {args.out}: {record['params_before']:,} -> {record['params_after']:,} params "
          f"(block widths {record['block_widths']}); fine-tune it with --config.model_init={args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
