"""Convert pretrained weights into a folder that `config.model_init` and `load_pretrained` read.

    python -m jaxclf.convert resnet50.pth --model resnet50 --out weights/resnet50 [--check]
    python -m jaxclf.convert ViT-B_16.npz --model vit_base_patch16_224 --out weights/vit_b16
    python -m jaxclf.convert hf_folder_or_org/name --out weights/hf_vit

The format is detected from the names in the file (`--format` to force it). The folder holds
`params.npz` (jaxclf param paths) and `pretrained.json` (model, source, preprocessing).
`--check` also runs the source model in its own library on random inputs and prints the largest
relative difference of the logits.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from jaxclf import weights
from jaxclf.weights import hub, reference
from jaxclf.weights.files import WeightsError


def check(source: str, out_dir: str, info: weights.Pretrained, batch: int = 2, seed: int = 0) -> float:
    """max |jaxclf - reference| / max |reference| over the logits of `batch` random images."""
    model, info = weights.load_pretrained(out_dir)
    size = info.preprocessing["input_size"]
    images = np.random.default_rng(seed).standard_normal((batch, size, size, 3), dtype=np.float32)
    ours = np.asarray(model(images))
    theirs = reference.reference_logits(hub.resolve(source), info.source_format, info.model_name,
                                        info.model_options, info.num_classes, images)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxclf.convert", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="weights file, Hugging Face/timm folder, or hub name")
    parser.add_argument("--model", default="", help="jaxclf model name (read from a hub config when there is one)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--format", default="", help=f"force the source format: {', '.join(f.name for f in weights.FORMATS)}")
    parser.add_argument("--check", action="store_true", help="compare logits with the source model (needs torch)")
    args = parser.parse_args(argv)
    try:
        params, info = weights.convert(args.source, args.model, args.format)
        weights.save(args.out, params, info)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.source} ({info.source_format}) -> {args.out}: {info.model_name} {info.model_options or ''}, "
          f"{info.num_classes} classes, {len(params)} arrays; preprocessing {info.preprocessing}")
    if args.check:
        try:
            difference = check(args.source, args.out, info)
        except ImportError as e:
            print(f"error: --check runs the source model in its own library, which is not installed ({e}); "
                  "`pip install -e .[test]` installs torch, timm and transformers", file=sys.stderr)
            return 2
        print(f"largest relative difference of the logits: {difference:.2e}")
        return 0 if difference < 1e-4 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
