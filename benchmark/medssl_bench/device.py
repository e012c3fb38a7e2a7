"""Device choice, mixed precision and seeding."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from medssl_bench.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {name} was requested but torch sees no CUDA GPU "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). "
            "Use --device cpu or --device auto."
        )
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"--device {name!r}: choose auto, cpu or cuda.")
    return torch.device(name)


def configure_backend(device: torch.device) -> None:
    """cuDNN autotune and TF32 convolutions on CUDA (fixed input sizes make autotune pay off).

    fp32 matmuls stay exact: the network's matmuls run in bf16 under autocast anyway, and the
    fp32 ones are the small affine algebra of the augmentations and the CPC scores, where
    TF32's 10-bit mantissa would move voxels at 128^3 by a tenth of a voxel."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op on the CPU (bf16 conv3d is slow there)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def worker_init(worker_id: int) -> None:
    """DataLoader worker seeding from the loader's base seed, so workers differ but repeat."""
    seed = torch.initial_seed() % (2**32)
    random.seed(seed + worker_id)
    np.random.seed((seed + worker_id) % (2**32))


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A torch.Generator on ``device`` (proxy-task batches are drawn where they are built)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
