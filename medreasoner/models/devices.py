"""Device and dtype choices shared by every model wrapper."""

from __future__ import annotations

import torch


def resolve_device(device: str | None = "auto") -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from medreasoner.models.loading import no_cuda_message

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(no_cuda_message(str(device), torch))  # same words as the options check
    return dev


def default_dtype(device: torch.device, dtype: str | torch.dtype | None = "auto") -> torch.dtype:
    """bf16 on GPUs that support it (fp16 on older ones), fp32 on CPU unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "", "auto"):
        return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[str(dtype)]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_asm_batch(device: torch.device, batch_size: int | None) -> int:
    """Images per ASM encoder batch: batching pays on GPUs; on a few CPU cores it is slower
    (benchmarks/ground2d.py measured 0.7x for LiteMedSAM on 2 cores), so CPU defaults to 1."""
    if batch_size:
        return max(1, int(batch_size))
    return 8 if device.type == "cuda" else 1
