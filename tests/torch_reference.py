"""Reference PyTorch models for converter tests: non-trivial norm parameters, and their logits on NHWC images."""

import numpy as np
import torch


def randomize_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm/LayerNorm/GroupNorm parameters and statistics, so a wrong mapping shows in the logits."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.GroupNorm)):
                if module.weight is not None:
                    module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                    module.bias.copy_(torch.rand(module.bias.shape, generator=generator) - 0.5)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model.eval()


def randomize_vectors(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter that is not a matrix or conv kernel (biases, layer scales, tokens, position embeddings,
    attention-pool latents) drawn from N(0, 0.2), then `randomize_norms`: init's zeros and 1e-5 layer scales
    would hide a wrong mapping."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim < 2 or not name.endswith("weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return randomize_norms(model)


def torch_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """The model's logits on NHWC float images (transformers' outputs unwrapped)."""
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))
    return (out.logits if hasattr(out, "logits") else out).numpy()


def torch_pre_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """A timm model's pooled features before its classifier (`forward_head(pre_logits=True)`) on NHWC images."""
    with torch.no_grad():
        features = model.forward_features(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))
        return model.forward_head(features, pre_logits=True).numpy()
