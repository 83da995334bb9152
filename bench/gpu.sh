#!/usr/bin/env bash
# Everything we measure on a GPU, in one go (a lent GPU is rare and its time short):
# the train-step benchmark at GPU settings (bf16, batch 128) for the four models, and the
# quickstart trained on the GPU (bf16 by config.dtype="auto") as an end-to-end check of the loop.
#   bash bench/gpu.sh [OUT_DIR]        # writes train_step_gpu_{large,small}.json to OUT_DIR
# Needs jax with CUDA, flax, optax, orbax, torch, timm, plus ml_collections and grain. On the
# workplace's lent GPUs only ml_collections, grain, array_record and portpicker are missing: carry
# them as wheels, and not flax (the image's flax matches its jax; flax 0.12.8 fails on jax 0.11.2).
set -u
out=${1:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$python -c "import jax, flax, torch, timm; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__, 'timm', timm.__version__)"

# The larger models twice (alternating frameworks), the smaller once: torch.compile's cold
# compile dominates the time this takes.
timeout "${BENCH_LARGE_S:-330}" $python bench/train_step.py --models resnet50,vit_base_patch16_224 \
  --batch 128 --steps 20 --rounds 2 --out "$out/train_step_gpu_large.json"
timeout "${BENCH_SMALL_S:-180}" $python bench/train_step.py --models resnet18,vit_small_patch16_224 \
  --batch 128 --steps 20 --rounds 1 --out "$out/train_step_gpu_small.json"

# jaxclf's ViTs with plain-JAX kernels (XLA's attention) instead of the GPU default (cuDNN's fused attention).
timeout "${BENCH_XLA_ATTENTION_S:-90}" $python bench/train_step.py --frameworks jaxclf --kernels plain \
  --models vit_base_patch16_224,vit_small_patch16_224 --batch 128 --steps 20 --rounds 1 \
  --out "$out/train_step_gpu_vit_xla_attention.json"

timeout "${TRAIN_S:-60}" $python -m jaxclf.train --config configs/quickstart.py --workdir /tmp/jaxclf_gpu_quickstart \
  --config.num_epochs=5 2>&1 | grep -v "leaked shared_memory" | tail -25
