"""A ViT's matmuls alone: XLA:CPU (jaxclf's compiler options) against PyTorch, same process, alternated.

    .venv/bin/python bench/matmul.py --model vit_small_patch16_224 --batch 16 --rounds 15

For each linear layer of one transformer block (qkv, proj, fc1, fc2 on [batch * tokens, width])
the three products of a train step: forward x W, input gradient dy W^T and weight gradient x^T dy;
for attention, the batched [tokens x tokens] x [tokens x head_dim] products in their three forms.
Each product is timed once per round, XLA and torch alternating; the table gives the median over
rounds and the ratio torch / XLA (above 1: XLA is faster). It bounds what the whole step can
reach: on these CPUs XLA runs matmuls on Eigen and torch on MKL/oneDNN. Writes JSON with --out.

torch's OpenMP threads spin after each op and took the cores from the XLA product timed next
(XLA's qkv forward 19 ms against 13.7 ms with them passive), so they are made passive here
(OMP_WAIT_POLICY=PASSIVE, unless set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP runtime

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from jaxclf.kernels import xla_cpu  # noqa: E402

# (width, heads, mlp width) of the ViTs; tokens = (size / 16) ** 2 + 1.
VITS = {"vit_small_patch16_224": (384, 6, 1536), "vit_base_patch16_224": (768, 12, 3072)}


def products(width: int, heads: int, hidden: int, rows: int, tokens: int, batch: int) -> dict:
    """name -> (jnp function of the operands, torch function of the operands, operand shapes, FLOPs)."""
    table = {}
    for layer, (n_in, n_out) in {"qkv": (width, 3 * width), "proj": (width, width),
                                 "fc1": (width, hidden), "fc2": (hidden, width)}.items():
        flops = 2 * rows * n_in * n_out
        table[f"{layer} x W"] = (lambda x, w: x @ w, torch.mm, [(rows, n_in), (n_in, n_out)], flops)
        table[f"{layer} dy W^T"] = (lambda dy, w: dy @ w.T, lambda dy, w: dy.mm(w.T), [(rows, n_out), (n_in, n_out)], flops)
        table[f"{layer} x^T dy"] = (lambda x, dy: x.T @ dy, lambda x, dy: x.T.mm(dy), [(rows, n_in), (rows, n_out)], flops)
    stacks, head_dim = batch * heads, width // heads
    flops = 2 * stacks * tokens * tokens * head_dim
    table["attn P V"] = (lambda p, v: p @ v, torch.bmm, [(stacks, tokens, tokens), (stacks, tokens, head_dim)], flops)
    table["attn P^T dO"] = (lambda p, v: p.swapaxes(1, 2) @ v, lambda p, v: p.transpose(1, 2).bmm(v),
                            [(stacks, tokens, tokens), (stacks, tokens, head_dim)], flops)
    table["attn Q K^T"] = (lambda q, k: q @ k.swapaxes(1, 2), lambda q, k: q.bmm(k.transpose(1, 2)),
                           [(stacks, tokens, head_dim), (stacks, tokens, head_dim)], flops)
    return table


def _seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224", choices=sorted(VITS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (XLA uses every core)")
    parser.add_argument("--out", help="write the table as JSON here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    tokens = (args.size // 16) ** 2 + 1
    options = xla_cpu.compiler_options("cpu", xla_cpu.VIT_TRAIN_OPTIONS)
    rng = np.random.default_rng(0)
    rows = []
    for name, (jax_fn, torch_fn, shapes, flops) in products(*VITS[args.model], args.batch * tokens, tokens, args.batch).items():
        operands = [rng.standard_normal(shape, np.float32) for shape in shapes]
        on_device = [jax.device_put(operand) for operand in operands]
        compiled = jax.jit(jax_fn, compiler_options=options).lower(*on_device).compile()
        torch_operands = [torch.from_numpy(operand) for operand in operands]
        run_xla = lambda: jax.block_until_ready(compiled(*on_device))
        run_torch = lambda: torch_fn(*torch_operands)
        run_xla(), run_torch()
        xla_s, torch_s = [], []
        for _ in range(args.rounds):
            xla_s.append(_seconds(run_xla))
            torch_s.append(_seconds(run_torch))
        xla_ms, torch_ms = statistics.median(xla_s) * 1e3, statistics.median(torch_s) * 1e3
        rows.append({"product": name, "shapes": shapes, "xla_ms": xla_ms, "torch_ms": torch_ms,
                     "xla_gflops": flops / xla_ms / 1e6, "torch_gflops": flops / torch_ms / 1e6})
    print(f"{args.model}, batch {args.batch}, {tokens} tokens, median of {args.rounds} alternated rounds")
    print(f"{'product':<16} {'XLA ms':>8} {'torch ms':>9} {'XLA GFLOP/s':>12} {'torch GFLOP/s':>14} {'torch/XLA':>10}")
    for row in rows:
        print(f"{row['product']:<16} {row['xla_ms']:8.2f} {row['torch_ms']:9.2f} {row['xla_gflops']:12.0f} "
              f"{row['torch_gflops']:14.0f} {row['torch_ms'] / row['xla_ms']:10.2f}")
    linear = [row for row in rows if not row["product"].startswith("attn")]
    totals = {side: sum(row[f"{side}_ms"] for row in linear) for side in ("xla", "torch")}
    print(f"linear layers of a block: XLA {totals['xla']:.1f} ms, torch {totals['torch']:.1f} ms "
          f"(torch/XLA {totals['torch'] / totals['xla']:.2f})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"settings": vars(args), "tokens": tokens, "rows": rows, "linear_block_ms": totals}, f, indent=1)


if __name__ == "__main__":
    main()
