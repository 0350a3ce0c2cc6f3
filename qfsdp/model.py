"""Load the base model (4-bit with bitsandbytes when `quant.enabled`) and attach LoRA adapters with PEFT."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from qfsdp.config import LoraConfig, ModelConfig, QuantConfig
from qfsdp.tiny import TINY_ARCHITECTURES, tiny_model_path, tiny_tokenizer_path

ARCHITECTURES_DIR = Path(__file__).parent / "architectures"


def resolve_path(cfg: ModelConfig) -> str:
    """Where to load from: the cached tiny model, a local directory, or a hub id."""
    if cfg.path in TINY_ARCHITECTURES:
        return str(tiny_model_path(cfg.path))
    local = Path(cfg.path).expanduser()
    return str(local) if local.exists() else cfg.path


def load_config(cfg: ModelConfig):
    """The model's `PretrainedConfig`: the bundled architecture for random init, else from its path."""
    from transformers import AutoConfig

    if cfg.random_init and cfg.architecture:
        # Bundled, so random-weight benchmarks need no hub access (and no network retries on offline hosts).
        spec = json.loads((ARCHITECTURES_DIR / f"{cfg.architecture}.json").read_text())
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    return AutoConfig.from_pretrained(resolve_path(cfg), trust_remote_code=cfg.trust_remote_code)


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    source = cfg.tokenizer or ("tiny" if cfg.random_init else cfg.path)
    path = tiny_tokenizer_path() if source in ("tiny", *TINY_ARCHITECTURES) else resolve_path(
        ModelConfig(path=source, trust_remote_code=cfg.trust_remote_code))
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def random_checkpoint(cfg: ModelConfig, dtype: torch.dtype) -> Path:
    """Write (once, cached) a random-weight checkpoint of the model's architecture and return its directory.

    Quantization then goes through the ordinary `from_pretrained` path, exactly as for a downloaded checkpoint.
    """
    from transformers import AutoModelForCausalLM

    from qfsdp.tiny import build_once

    config = load_config(cfg)
    path = random_checkpoint_path(cfg, dtype)
    if not (path / "config.json").exists():
        def build(out: Path) -> None:
            torch.manual_seed(0)
            # on this process' own GPU: random init of billions of parameters is minutes on a CPU
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            model.save_pretrained(out)
        build_once(path, build)
    return path


def random_checkpoint_path(cfg: ModelConfig, dtype: torch.dtype) -> Path:
    """Where `random_checkpoint` caches the random-weight checkpoint of `cfg` in `dtype`."""
    from qfsdp.tiny import cache_dir

    name = (cfg.architecture or Path(cfg.path).name).replace("/", "_")
    return cache_dir() / f"random-{name}-{str(dtype).removeprefix('torch.')}"


def checkpoint_dtype(compute_dtype: torch.dtype, full_finetune: bool) -> torch.dtype:
    # Frozen full-precision base weights are stored in the compute dtype; trained ones in float32 (master weights).
    return torch.float32 if full_finetune else compute_dtype


def prepare_checkpoint(model_cfg: ModelConfig, compute_dtype: torch.dtype, full_finetune: bool = False) -> str:
    """Directory or hub id to load from, building the tiny model or a random checkpoint first if needed.

    Call before the process group exists: locally built checkpoints are written by every process that needs one.
    """
    if model_cfg.random_init:
        return str(random_checkpoint(model_cfg, checkpoint_dtype(compute_dtype, full_finetune)))
    return resolve_path(model_cfg)


def bnb_config(quant_cfg: QuantConfig, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_cfg.quant_type,
        bnb_4bit_use_double_quant=quant_cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=getattr(torch, quant_cfg.storage),
    )


def load_model(model_cfg: ModelConfig, quant_cfg: QuantConfig, compute_dtype: torch.dtype,
               full_finetune: bool = False):
    """Load the base model into CPU memory; `shard.parallelize` then moves it to the device one layer at a time.

    With `quant_cfg.enabled`, the linear layers become bitsandbytes `Linear4bit`s that still hold their
    full-precision weights (`defer_4bit`): bitsandbytes quantizes a weight when it moves to a device, so each layer
    is quantized on the GPU as it arrives and sharded before the next one comes. No GPU ever holds the whole model,
    which transformers' own 4-bit loading (quantize everything onto one device, then shard) cannot avoid.
    A checkpoint saved in 4-bit loads as saved: packed bytes in CPU memory, moved the same way.

    Frozen weights load in the checkpoint's own dtype, so they stay memory-mapped (one copy in the page cache for all
    processes of a host); `shard.parallelize` casts each layer to the compute dtype just before it moves. Loading in
    the compute dtype would give every process a private converted copy (2 x 16 GB for 8B bf16 -> fp16 on 2 GPUs).
    Trained weights (full fine-tuning) load as float32 master weights.
    """
    from transformers import AutoModelForCausalLM

    path = prepare_checkpoint(model_cfg, compute_dtype, full_finetune)
    config = load_config(ModelConfig(path=path, trust_remote_code=model_cfg.trust_remote_code))
    prequantized = getattr(config, "quantization_config", None) is not None
    model = AutoModelForCausalLM.from_pretrained(
        path,
        **dropout_overrides(config, model_cfg.dropout),
        dtype=torch.float32 if full_finetune else "auto",  # float32 masters, see checkpoint_dtype
        device_map={"": "cpu"},
        attn_implementation=model_cfg.attn_implementation,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    if quant_cfg.enabled and not prequantized:
        defer_4bit(model, bnb_config(quant_cfg, compute_dtype))
    if prequantized:
        compute_4bit_in(model, compute_dtype)
    model.config.use_cache = False
    return model


def dropout_overrides(config, dropout: float | None) -> dict[str, float]:
    """Config attributes that `model.dropout` replaces: every dropout probability the architecture has."""
    if dropout is None:
        return {}
    return {k: dropout for k, v in config.to_dict().items()
            if k.endswith("dropout") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def compute_4bit_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Dequantize a checkpoint saved in 4-bit to `precision`'s dtype, whatever compute dtype it was saved with
    (pre-quantized hub checkpoints say bfloat16, which a T4 cannot compute in)."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype = dtype
            m.weight.quant_state.dtype = dtype  # the dtype dequantize_4bit returns


def defer_4bit(model: nn.Module, config) -> None:
    """Turn the model's linear layers into `bnb.nn.Linear4bit`s whose weights quantize when they reach a device.

    The same modules transformers' bitsandbytes integration converts (every `nn.Linear` except the output head and
    the model's float32 modules), with the same `Params4bit` settings; and the same markers it leaves, which PEFT
    (LoRA for 4-bit layers) and TRL read: `is_loaded_in_4bit` and `config.quantization_config`.
    tests/test_models_and_data.py checks the result trains exactly like a checkpoint transformers quantized.
    """
    import bitsandbytes as bnb

    for name in linears_to_quantize(model, config):
        module = model.get_submodule(name)
        linear4 = bnb.nn.Linear4bit(
            module.in_features, module.out_features, bias=module.bias is not None,
            compute_dtype=config.bnb_4bit_compute_dtype, compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type, quant_storage=config.bnb_4bit_quant_storage, device="meta",
        )
        linear4.weight = params_4bit(module.weight.data, config, linear4)
        if module.bias is not None:
            linear4.bias = nn.Parameter(module.bias.data, requires_grad=False)
        linear4.requires_grad_(False)
        model.set_submodule(name, linear4)
    model.is_loaded_in_4bit = True
    model.config.quantization_config = config


def linears_to_quantize(model: nn.Module, config) -> list[str]:
    """Names of the linear layers `defer_4bit` turns into 4-bit ones (a model on the meta device will do)."""
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    # transformers' own rules for what stays unquantized (head, tied and float32 modules, configured skips)
    skip = [*get_keys_to_not_convert(model), *(config.llm_int8_skip_modules or []),
            *(getattr(model, "_keep_in_fp32_modules", None) or [])]
    return [name for name, module in model.named_modules()
            if type(module) is nn.Linear and should_convert_module(name, skip)]


def params_4bit(weight: torch.Tensor, config, module: nn.Module | None = None):
    """`weight` as bitsandbytes' `Params4bit` with the run's settings; it quantizes when it moves to a device."""
    import bitsandbytes as bnb

    return bnb.nn.Params4bit(
        weight, requires_grad=False, compress_statistics=config.bnb_4bit_use_double_quant,
        quant_type=config.bnb_4bit_quant_type, quant_storage=config.bnb_4bit_quant_storage, module=module,
    )


def apply_kernels(model: nn.Module, kernels) -> None:
    """Swap in fused kernels (config `kernels`) on the loaded model, before LoRA wraps its linear layers and FSDP2
    shards it. Liger binds new forwards to the norm and MLP instances (which keep their weights and submodules, so
    PEFT's LoRA layers and FSDP2's hooks see the same modules) and replaces Llama's RoPE function in its module."""
    if getattr(kernels, "value", kernels) != "liger":
        return
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    # TRL's SFTTrainer replaces the model's forward with its own chunked head and loss and refuses Liger's.
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=model)


def peft_lora_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    target = cfg.target_modules
    target = target if isinstance(target, str) else list(target)
    return PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=target, bias=cfg.bias,
        task_type="CAUSAL_LM",
    )


def attach_lora(model: nn.Module, cfg: LoraConfig, seed: int) -> nn.Module:
    """Wrap `model` with LoRA adapters, initialized identically on every rank (same seed everywhere).

    FSDP2 does not synchronize parameters across ranks: a rank-dependent LoRA init would train silently wrong.
    `check_same_on_all_ranks` verifies it after sharding.
    """
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, peft_lora_config(cfg))


def make_trainable_fp32(model: nn.Module) -> None:
    """Keep every trainable parameter in float32 (master weights; FSDP2 casts its gathered copy for compute).

    TRL's SFTTrainer casts LoRA weights of quantized models to bfloat16; in bf16, 1- vs N-process runs drift
    (different accumulation order), while fp32 LoRA weights give identical losses across world sizes.
    """
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks to shard, found from the model's own `_no_split_modules` (any architecture)."""
    base = base_model(model)
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"found no decoder layers to shard in {type(base).__name__} (its _no_split_modules is {sorted(names)})"
        )
    return layers
