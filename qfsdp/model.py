"""Load the base model (4-bit with bitsandbytes when `quant.enabled`) and attach LoRA adapters with PEFT."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from qfsdp.config import LoraConfig, ModelConfig, QuantConfig
from qfsdp.tiny import TINY_ARCHITECTURES, tiny_config, tiny_model_path, tiny_tokenizer_path

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
    if cfg.random_init and cfg.path in TINY_ARCHITECTURES:
        return tiny_config(cfg.path)  # without building the tiny model's weights
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


def prepare_checkpoint(model_cfg: ModelConfig, compute_dtype: torch.dtype,
                       full_finetune: bool = False) -> str | None:
    """Directory or hub id to load from, building the tiny model or a random checkpoint first if needed; None for
    random weights drawn on the device (`random_model`: nothing to build).

    Call before the process group exists: locally built checkpoints are written by every process that needs one.
    """
    if model_cfg.random_init:
        if not model_cfg.random_checkpoint:
            load_config(model_cfg)  # builds the tiny tokenizer a tiny model's config is sized to, if needed
            return None
        return str(random_checkpoint(model_cfg, checkpoint_dtype(compute_dtype, full_finetune)))
    return resolve_path(model_cfg)


def stock_checkpoint(model_cfg: ModelConfig) -> str:
    """What the stock recipe (transformers' own 4-bit loading) reads: a checkpoint in bf16, random ones included."""
    if model_cfg.random_init:
        return str(random_checkpoint(model_cfg, torch.bfloat16))
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
               full_finetune: bool = False, seed: int = 0):
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

    `model.random_init` without `model.random_checkpoint`: no checkpoint, see `random_model` (`seed` draws it).
    """
    from transformers import AutoModelForCausalLM

    if model_cfg.random_init and not model_cfg.random_checkpoint:
        return random_model(model_cfg, quant_cfg, compute_dtype, full_finetune, seed)
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


def random_model(model_cfg: ModelConfig, quant_cfg: QuantConfig, compute_dtype: torch.dtype, full_finetune: bool,
                 seed: int):
    """The model's architecture with random weights that exist nowhere yet: `shard.parallelize` draws each module's
    weights on the device just before it is quantized and sharded (`RandomWeights`), so no full-precision copy of
    the model is ever written or held, at any size.

    The model is built by transformers on the meta device (accelerate's `init_empty_weights`; buffers such as rotary
    frequencies are computed as usual), then every weight becomes a stand-in of its shape that holds one element,
    on the CPU: PEFT places LoRA weights on their base layer's device, and must see the CPU as for a checkpoint.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = load_config(model_cfg)
    for key, value in dropout_overrides(config, model_cfg.dropout).items():
        setattr(config, key, value)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=checkpoint_dtype(compute_dtype, full_finetune),
            attn_implementation=model_cfg.attn_implementation, trust_remote_code=model_cfg.trust_remote_code)
    model.tie_weights()  # init_empty_weights gives each module a meta parameter of its own: tie them again
    stand_in = _replace_meta_weights(model)
    if quant_cfg.enabled:
        defer_4bit(model, bnb_config(quant_cfg, compute_dtype))
    model.config.use_cache = False
    pending = {m: name for name, m in model.named_modules()
               if any(_is_stand_in(p, stand_in) for p in m.parameters(recurse=False))}
    model._qfsdp_random_weights = RandomWeights(seed, model._init_weights, pending, stand_in)
    return model


def _replace_meta_weights(model: nn.Module) -> dict[torch.dtype, torch.Tensor]:
    """Every meta parameter becomes a stand-in: one element per dtype, expanded to the parameter's shape (tied
    parameters stay one parameter). Returns the elements, which identify stand-ins."""
    elements: dict[torch.dtype, torch.Tensor] = {}
    replaced: dict[int, nn.Parameter] = {}
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in replaced:
                element = elements.setdefault(p.dtype, torch.zeros((), dtype=p.dtype))
                replaced[id(p)] = nn.Parameter(element.expand(p.shape), requires_grad=p.requires_grad)
            m._parameters[name] = replaced[id(p)]
    return elements


def _is_stand_in(p: torch.Tensor, elements: dict[torch.dtype, torch.Tensor]) -> bool:
    element = elements.get(p.dtype)
    return element is not None and p.data.untyped_storage().data_ptr() == element.untyped_storage().data_ptr()


class RandomWeights:
    """Draws the weights of a `random_model`, module by module, on the device that will hold them.

    Each module's weights come from its own seed, a hash of (`seed`, the module's name: the decoder layer's index is
    part of it), drawn by the model's own `_init_weights` (the distributions `from_config` uses). So the same seed gives
    the same weights at any world size and in any order of drawing, on the same kind of device (CPU and CUDA random
    generators differ). 4-bit layers get bitsandbytes' `Params4bit` with the settings `defer_4bit` gave them: moved
    to the device, they quantize exactly as a checkpoint's weights do.
    """

    def __init__(self, seed: int, init, pending: dict[nn.Module, str], stand_in: dict[torch.dtype, torch.Tensor]):
        self.seed, self.init, self.pending, self.stand_in = seed, init, pending, stand_in
        # Only a tied weight's drawn parameter is kept, for its other module: a reference to any other would keep
        # its full-precision data alive after quantization and sharding (a 70B model's, layer after layer).
        uses = Counter(id(p) for m in pending for p in m._parameters.values()
                       if p is not None and _is_stand_in(p, stand_in))
        self.tied = {key for key, n in uses.items() if n > 1}
        self.drawn: dict[int, nn.Parameter] = {}  # tied stand-in's id -> its drawn parameter (drawn once)

    def __call__(self, module: nn.Module, device: torch.device) -> None:
        """Draw every weight under `module` still missing, on `device`."""
        for m in list(module.modules()):
            if m in self.pending:
                self._draw(m, self.pending.pop(m), device)

    def check_done(self) -> None:
        if self.pending:
            raise RuntimeError(f"random weights never drawn for {sorted(self.pending.values())[:5]}: "
                               "shard.parallelize must draw every module before it computes")
        self.drawn.clear()  # every tie is drawn: the modules hold their weights, nothing else may

    def _draw(self, m: nn.Module, name: str, device: torch.device) -> None:
        import hashlib

        import bitsandbytes as bnb

        fresh = False
        for key, p in list(m._parameters.items()):
            if p is None or not _is_stand_in(p, self.stand_in):
                continue
            new = self.drawn.get(id(p))
            if new is None:
                new = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad)
                fresh = True
            if isinstance(p, bnb.nn.Params4bit):  # the settings defer_4bit gave it; quantizes on its move
                new = bnb.nn.Params4bit(new.data, requires_grad=False, blocksize=p.blocksize,
                                        compress_statistics=p.compress_statistics, quant_type=p.quant_type,
                                        quant_storage=p.quant_storage, module=m)
            if id(p) in self.tied:
                self.drawn[id(p)] = new
            m._parameters[key] = new
        if not fresh:
            return  # a tied weight, drawn with its other module
        digest = hashlib.sha256(f"{self.seed}/{name}".encode()).digest()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            self.init(m)


def random_weights(model: nn.Module) -> RandomWeights | None:
    """The `RandomWeights` still to draw for a `random_model` (PEFT-wrapped or not), else None."""
    return getattr(base_model(model), "_qfsdp_random_weights", None)


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
