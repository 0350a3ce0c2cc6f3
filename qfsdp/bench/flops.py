"""Model FLOPs per trained token and GPU peak rates: the one MFU definition, used by the benchmark and sweep reports.

FLOPs per token (QLoRA, recompute not counted): 4 * N_linear + 12 * L * s * d, where N_linear is every projection
and the head (forward 2N, backward input gradients 2N; frozen base weights get no weight gradients, LoRA's are
negligible), and 12 * L * s * d the attention scores and values (forward and backward, no causal discount), for L
layers, sequence length s, hidden size d.

MFU = tokens/s per GPU * FLOPs per token / peak FLOP/s of that GPU. The benchmark divides by a bf16 matmul rate it
measures in the same call; sweeps measure nothing, so they divide by the datasheet peak below (lower MFU figures:
an H200 reaches ~800 of its 989 TFLOP/s on a large bf16 matmul).
"""

from __future__ import annotations

import re

from omegaconf import DictConfig

# Dense (no 2:4 sparsity) tensor-core peak in TFLOP/s of each GPU, in the 16-bit dtype qfsdp computes in: bf16, or
# fp16 on GPUs without bf16 (T4, V100), from NVIDIA's datasheets. Matched against torch.cuda.get_device_name() in
# order, first match wins, so specific names (H100 PCIe) come before general ones (H100 = SXM). A GPU not listed
# gets no MFU rather than a guess.
PEAK_TFLOPS_16BIT: list[tuple[str, float]] = [
    (r"H100 NVL", 835.0),
    (r"H100 PCIe", 756.0),
    (r"H100", 989.0),  # SXM5: "NVIDIA H100 80GB HBM3"
    (r"H200 NVL", 835.0),
    (r"H200", 989.0),  # SXM, and GH200 (its GPU is an H100 SXM)
    (r"A100", 312.0),  # SXM4 and PCIe
    (r"L40S", 362.0),
    (r"L40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),  # not A10G, whose rate NVIDIA does not publish
    (r"V100-PCIE", 112.0),
    (r"V100", 125.0),  # SXM2, fp16
    (r"\bT4\b", 65.0),  # fp16
]
SIXTEEN_BIT = ("bfloat16", "float16")
# What flops_per_token counts, as reports print it beside their MFU.
FORMULA = ("4·N_linear + 12·L·s·d (N_linear: the projections and head; L layers, sequence length s, hidden size d; "
           "recompute not counted)")


def peak_tflops(device: str | None, dtype: str) -> float | None:
    """Datasheet peak of `device` (a CUDA device name) for `dtype`, or None: CPU, an unlisted GPU, or float32 (MFU
    against the 16-bit tensor-core peak would mislead there)."""
    if not device or device == "cpu" or dtype not in SIXTEEN_BIT:
        return None
    for pattern, tflops in PEAK_TFLOPS_16BIT:
        if re.search(pattern, device):
            return tflops
    return None


def flops_per_token(cfg: DictConfig) -> float:
    """FLOPs per trained token for the model and sequence length of a composed qfsdp config (see the module doc).

    s is the synthetic data's sequence length, else `trainer.max_length` (an upper bound on real data, so MFU there
    is slightly overstated by the attention term).
    """
    from qfsdp.config import ModelConfig
    from qfsdp.model import load_config

    c = load_config(ModelConfig(**cfg.model))
    d, L, ff, V = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size
    kv = c.num_key_value_heads * (d // c.num_attention_heads)
    n_linear = L * (2 * d * d + 2 * d * kv + 3 * d * ff) + d * V
    s = cfg.dataset.seq_length if cfg.dataset.name == "synthetic" else cfg.trainer.max_length
    if s is None:
        raise ValueError("no sequence length: trainer.max_length is null")
    return 4 * n_linear + 12 * L * s * d


def mfu(tokens_per_second: float, world_size: int, flops_per_token: float, peak_tflops: float) -> float:
    """Model FLOPs utilization of one GPU, as a fraction."""
    return tokens_per_second / world_size * flops_per_token / (peak_tflops * 1e12)
