#!/usr/bin/env bash
# Everything we measure on a GPU, in one go (a lent GPU is rare and its time short):
# the train-step benchmark at GPU settings (bf16, batch 128) for the four models, the whole
# training loop on a JPEG folder against the step alone (ResNet-50, ViT-B/16), and the
# quickstart trained on the GPU (bf16 by config.dtype="auto") as an end-to-end check of the loop,
# remat's saving of temporaries, and TensorRT engines (fp16, int8) built from the ONNX export against JAX.
#   bash bench/gpu.sh [OUT_DIR]        # writes train_step_gpu_{large,small}.json, train_loop_gpu.json, memory_gpu.json, tensorrt_gpu.json
#   GPU_PARTS=train_loop bash bench/gpu.sh   # only some parts (train_step, families, train_loop, quickstart, memory, tensorrt; default all)
#   GPU_PARTS=memory bash bench/gpu.sh       # remat's saving of temporaries (ResNet-50, ViT-B/16, batch 64): memory_gpu.json
# Needs jax with CUDA, flax, optax, orbax, torch, timm, plus ml_collections and grain. On the
# workplace's lent GPUs only ml_collections, grain, array_record and portpicker are missing (and
# simplejpeg, opencv-python-headless for train_loop's fast input): carry them as wheels, and not flax
# (the image's flax matches its jax; flax 0.12.8 fails on jax 0.11.2). All parts at their default
# timeouts take ~34 min: with a 15-minute device budget run train_step, families, train_loop and memory in separate calls.
set -u
out=${1:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
parts=",${GPU_PARTS:-train_step,families,train_loop,quickstart,memory,tensorrt},"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$python -c "import jax, flax, torch, timm; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__, 'timm', timm.__version__)"
$python -c "import os, simplejpeg, cv2; print('fast input: simplejpeg', simplejpeg.__version__, 'opencv', cv2.__version__, 'cores', len(os.sched_getaffinity(0)))" \
  || echo "fast input missing (pip install simplejpeg opencv-python-headless): train_loop measures Pillow's path"

if [[ $parts == *,train_step,* ]]; then
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

fi

if [[ $parts == *,families,* ]]; then
# The newer families against timm (eager and torch.compile) in bf16: EfficientNet-B0, MobileNetV3-Large and
# ConvNeXt-T (cuDNN's depthwise convolutions; the CPU's tap formulation is not used on GPUs), then
# DINOv2-S/14 and EVA-02-S (cuDNN's fused attention).
timeout "${BENCH_FAMILIES_S:-300}" $python bench/train_step.py \
  --models efficientnet_b0,mobilenetv3_large_100,convnext_tiny --batch 128 --steps 20 --rounds 1 \
  --out "$out/train_step_gpu_families.json"
timeout "${BENCH_VITFAM_S:-180}" $python bench/train_step.py \
  --models vit_small_patch14_dinov2,eva02_small_patch14_224 --batch 64 --steps 20 --rounds 1 \
  --out "$out/train_step_gpu_vitfam.json"
fi

if [[ $parts == *,train_loop,* ]]; then
# The whole training loop on the input bench's JPEG folder (decode|inception_crop(224)|flip_lr) against
# the step alone on device-resident data, bf16, every core but the training process's as grain workers
# (--workers -1). Needs jaxclf[fastjpeg] (simplejpeg, opencv-python-headless) for the fast input path;
# without it Pillow decodes (about half the images per core). Not yet run on a GPU. The table's
# "workers needed" column says how many cores the input needs to match the step alone.
timeout "${TRAIN_LOOP_S:-480}" $python bench/train_loop.py --models resnet50,vit_base_patch16_224 \
  --batch 128 --log_every 10 --windows 4 --dtype bfloat16 --workers "${TRAIN_LOOP_WORKERS:--1}" \
  --images 2048 --out "$out/train_loop_gpu.json" 2>&1 | grep -v "leaked shared_memory" | tail -8

fi

if [[ $parts == *,quickstart,* ]]; then
timeout "${TRAIN_S:-60}" $python -m jaxclf.train --config configs/quickstart.py --workdir /tmp/jaxclf_gpu_quickstart \
  --config.num_epochs=5 2>&1 | grep -v "leaked shared_memory" | tail -25
fi

if [[ $parts == *,memory,* ]]; then
# Remat (config.model.remat) against none for ResNet-50 and ViT-B/16: the train step's temporaries at
# batch 64, 224 px, bf16 (XLA's compiled memory analysis, as --dry_run prints it; compile only), then
# the step time of each policy at the same batch. The goal: >= 40% fewer temporaries. ~5 min.
timeout "${MEMORY_S:-420}" $python bench/memory.py --models resnet50,vit_base_patch16_224 --batch 64 --size 224 \
  --time_batch 64 --time_size 224 --steps 5 --rounds 2 --out "$out/memory_gpu.json"
fi

if [[ $parts == *,tensorrt,* ]]; then
# TensorRT from the ONNX export (bench/tensorrt_bench.py): fp16 and QDQ int8 engines, logits and latency against
# JAX on the GPU. Needs the tensorrt package, which the lent GPUs lack and which cannot be carried (PyPI's
# tensorrt-cu13-libs is a stub that downloads the libraries from NVIDIA's index): without it, or without a
# GPU, the script says so, writes {"skipped": reason} and exits 0.
# The package is checked first here, so that a GPU without it spends no time on the exports.
if (cd /tmp && $python -c "import tensorrt" 2>/dev/null); then
  timeout "${TENSORRT_S:-300}" $python bench/tensorrt_bench.py --models resnet18,mobilenetv3_large_100 \
    --out "$out/tensorrt_gpu.json"
else
  echo "tensorrt: skipped: the tensorrt package is not installed for $python"
fi
fi
