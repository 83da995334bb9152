"""Whether a change alters the train step XLA runs: the lowered program's hash, this checkout against another.

    git worktree add /tmp/base aa384cc
    .venv/bin/python bench/step_program.py --base-tree /tmp/base --models resnet18,vit_small_patch16_224

Each (model, kernel set) train step of `bench/train_step.py` is lowered to StableHLO in a fresh process per
tree, source locations stripped, and hashed. Equal hashes mean the same program: the same speed and memory
by construction, a before/after that no noise can blur (a timing on a shared 2-core machine cannot tell 3%).
Where they differ it prints the first differing lines, so the change can be read, then timed with
`train_step.py --base-tree`. Writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def lowered_program(model: str, kernels: str, size: int, batch: int) -> str:
    """The train step's StableHLO text for `model` with kernel set `kernels`, without source locations."""
    import jax

    sys.path.insert(0, HERE)
    from train_step import _jaxclf_step

    step, state, data = _jaxclf_step(model, batch, size, "float32", jax.devices()[:1], kernels)
    text = step.lower(state, data).as_text()
    return re.sub(r"#loc[^\n]*", "", re.sub(r"\s*loc\([^\n]*?\)", "", text))


def _program_in(tree: str, model: str, kernels: str, size: int, batch: int) -> str:
    """`lowered_program` computed by the jaxclf and bench/ of checkout `tree` (each tree builds its step with
    its own `train_step.py`, so a change of jaxclf's module layout or API compares too), in a fresh process."""
    bench = os.path.join(tree, "bench")
    code = (f"import sys; sys.path.insert(0, {bench!r}); from step_program import lowered_program; "
            f"sys.stdout.write(lowered_program({model!r}, {kernels!r}, {size}, {batch}))")
    env = {**os.environ, "PYTHONPATH": tree, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=tree, check=True, capture_output=True,
                          text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-tree", required=True, help="the other checkout (e.g. a git worktree of main)")
    parser.add_argument("--models", default="resnet18,resnet50,vit_small_patch16_224,resnetv2_50x1_bit")
    parser.add_argument("--kernels", default="cpu,plain", help="kernel sets, comma-separated")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args()
    this_tree = os.path.dirname(HERE)
    rows = []
    print(f"{'model':<26} {'kernels':<8} {'base':<16} {'this':<16} same")
    for model in args.models.split(","):
        for kernels in args.kernels.split(","):
            base, this = (_program_in(tree, model, kernels, args.size, args.batch) for tree in (args.base_tree, this_tree))
            digests = [hashlib.sha256(text.encode()).hexdigest()[:16] for text in (base, this)]
            rows.append({"model": model, "kernels": kernels, "base": digests[0], "this": digests[1],
                         "same": base == this, "size": args.size, "batch": args.batch})
            print(f"{model:<26} {kernels:<8} {digests[0]:<16} {digests[1]:<16} {'yes' if base == this else 'NO'}")
            if base != this:
                diff = difflib.unified_diff(base.splitlines(), this.splitlines(), "base", "this", n=0, lineterm="")
                print("\n".join(list(diff)[:12]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"base_tree": args.base_tree, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
