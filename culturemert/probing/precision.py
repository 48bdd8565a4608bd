"""The arithmetic of feature extraction (thesis 3.5.2): float32, or reduced precision on CUDA.

``float32`` is exact float32 everywhere: on CUDA with TF32 turned off for cuDNN's convolutions
(which PyTorch allows by default) and for matrix products (off by default), so the states
equal those of the CPU and of transformers' ``HubertModel`` within float32 rounding.
``bfloat16`` and ``float16`` run the model under autocast on CUDA: matrix products and
convolutions in 16 bits with float32 accumulation, norms and softmax in float32, so hidden states
differ from float32's (`benchmarks/extract_features.py` prints by how much; the CUDA test holds
the pooled features within 3 % of float32's); the cache records the precision, so features of two
precisions are never mixed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_precision(precision: str, device: torch.device | str) -> None:
    """Raise ValueError with a one-line fix unless ``precision`` can run on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision != "float32" and torch.device(device).type != "cuda":
        raise ValueError(
            f"precision {precision} runs on CUDA only (on the CPU it is slower than float32); "
            "pass --device cuda or --precision float32"
        )


@contextlib.contextmanager
def computation(precision: str, device: torch.device | str) -> Iterator[None]:
    """Inference in ``precision`` on ``device`` (module docstring); checks it first."""
    check_precision(precision, device)
    device = torch.device(device)
    if device.type != "cuda":
        with torch.inference_mode():
            yield
        return
    cudnn = torch.backends.cudnn
    flags = cudnn.flags(
        enabled=cudnn.enabled,
        benchmark=cudnn.benchmark,
        deterministic=cudnn.deterministic,
        allow_tf32=False,
    )
    dtype = PRECISIONS[precision]
    matmul = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    autocast = torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)
    try:
        with torch.inference_mode(), flags, autocast:
            yield
    finally:
        torch.set_float32_matmul_precision(matmul)
