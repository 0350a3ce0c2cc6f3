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

    from qfsdp.tiny import build_once, cache_dir

    config = load_config(cfg)
    name = (cfg.architecture or Path(cfg.path).name).replace("/", "_")
    path = cache_dir() / f"random-{name}-{str(dtype).removeprefix('torch.')}"
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


def load_model(model_cfg: ModelConfig, quant_cfg: QuantConfig, compute_dtype: torch.dtype, device: torch.device,
               full_finetune: bool = False):
    """Load the base model onto `device`, quantized to 4 bits when `quant_cfg.enabled`."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    storage_dtype = checkpoint_dtype(compute_dtype, full_finetune)
    path = prepare_checkpoint(model_cfg, compute_dtype, full_finetune)
    config = load_config(ModelConfig(path=path, trust_remote_code=model_cfg.trust_remote_code))
    kwargs = {}
    if getattr(config, "quantization_config", None) is None and quant_cfg.enabled:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_cfg.quant_type,
            bnb_4bit_use_double_quant=quant_cfg.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=getattr(torch, quant_cfg.storage),
        )
    # A pre-quantized checkpoint (config.json names its quantization) loads as saved: passing
    # quantization_config=None explicitly would override that and load garbage shapes.
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=storage_dtype,
        device_map={"": device},
        attn_implementation=model_cfg.attn_implementation,
        trust_remote_code=model_cfg.trust_remote_code,
        **kwargs,
    )
    model.config.use_cache = False
    return model


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


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks to shard, found from the model's own `_no_split_modules` (any architecture)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"found no decoder layers to shard in {type(base).__name__} (its _no_split_modules is {sorted(names)})"
        )
    return layers
