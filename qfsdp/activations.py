"""`fsdp2.checkpointed_layers=auto`: how many decoder layers recompute their activations in backward.

Recompute is about a third of a checkpointed step's compute (8B on an H100: 1.43x faster without it) and each layer
that skips it keeps its activations instead. `auto` (the default) lets as many of the last layers keep them as the
GPU's memory, or `gpu_memory_limit_gib`, holds, for micro batches of the data's longest tokenized row (within
`trainer.max_length`), decided once the trainer has tokenized the data and before the layers are sharded and compiled:

    peak, every layer checkpointed = weights, LoRA weights, their gradients and AdamW state on this GPU
                                     + every layer's checkpointed input + one layer's activations (its recompute)
                                     + transients (a dequantized weight and its neighbour, a few hidden-state copies)
    each layer that keeps its activations adds them, less the input checkpointing would have kept

One layer's activations are measured, not estimated: a one-layer copy of the model runs its forward on the run's device
and the bytes autograd saves are counted (`saved_bytes_per_token`). The recompute's share (one layer at a time) is
counted eager; with torch.compile on, the layers that keep their activations are counted compiled as they will run
(compiled layers save about 30% less at the 8B shape), once the eager count shows that not every layer fits. Fused
kernels (kernels=liger) save less again and are not counted: the count errs on the safe side. On CPU there is no
device memory to plan for: every layer recomputes. docs/design.md, "How many layers recompute", has the
measurements the arithmetic was checked against.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from qfsdp.config import compile_enabled

logger = logging.getLogger(__name__)

GIB = 2**30
# Of the GPU's memory (or cap): the caching allocator reserves ~9% above what it hands out (10.24 allocated,
# 11.13 reserved for 8B on an H100), and the CUDA context and NCCL's buffers sit outside it.
RESERVED_SLACK = 0.9
OUTSIDE_ALLOCATOR = 1 * GIB
PROBE_TOKENS = 64  # the probe's row when none is given (tests)


@dataclass(frozen=True)
class CheckpointPlan:
    """What `auto` chose, with the numbers it chose by (bytes)."""

    layers: int
    checkpointed: int  # the first `checkpointed` layers recompute; the rest keep their activations
    budget: float  # what this GPU may hold (its memory or cap, less the slack above)
    fixed: float  # the predicted peak with every layer recomputing
    layer: float  # one layer's activations at the run's micro batch, eager (what a recompute holds)
    layer_input: float  # what checkpointing keeps of a layer instead
    kept: float  # one layer's activations as a layer that keeps them runs (compiled where compile is on)
    compiled: bool  # whether `kept` was counted compiled
    row: int  # the most tokens a row of the micro batch holds (row_length)

    def describe(self) -> str:
        kept = self.layers - self.checkpointed
        return (f"fsdp2.checkpointed_layers=auto: {self.checkpointed} of {self.layers} decoder layers recompute, "
                f"{kept} keep{'s its' if kept == 1 else ' their'} activations ({self.kept / GIB:.2f} GiB a layer, "
                f"measured {'compiled' if self.compiled else 'eager'}, rows of up to {self.row} tokens); "
                f"predicted peak {self.peak / GIB:.1f} of {self.budget / GIB:.1f} GiB")

    @property
    def peak(self) -> float:
        """The predicted peak with `checkpointed` layers recomputing."""
        return self.peak_with(self.checkpointed)

    def peak_with(self, checkpointed: int | None) -> float:
        """The predicted peak with `checkpointed` layers recomputing (None: all), as when another rank's plan
        decides."""
        kept = 0 if checkpointed is None else self.layers - checkpointed
        return self.fixed + kept * (self.kept - self.layer_input)


def checkpointed_count(layers: int, fixed: float, layer: float, layer_input: float, budget: float) -> int:
    """How many of `layers` must recompute so that `fixed` (the peak with all of them recomputing) plus what each
    other layer adds (`layer - layer_input`) stays within `budget`."""
    extra = max(layer - layer_input, 1.0)
    kept = max(0, min(layers, math.floor((budget - fixed) / extra)))
    return layers - kept


def saved_bytes_per_token(config, dtype: torch.dtype, device: torch.device, attn_implementation: str = "sdpa",
                          tokens: int = PROBE_TOKENS, autocast: bool = False, compiled: bool = False,
                          deterministic: bool = False) -> float:
    """Bytes autograd keeps for backward per token of one decoder layer of `config`'s architecture, for a row of
    `tokens` (attention without a fused kernel keeps a row-squared matrix: probe at the run's row length): a one-layer
    copy of the model (weights uninitialized, embedding left unallocated) runs its forward on `device` and every
    tensor saved inside the layer is counted once (by storage), weights excluded. `autocast`: under autocast to
    `dtype`, as Trainer runs fp16 with loss scaling. `compiled`: the layer is compiled as a layer that keeps its
    activations is in training (`shard.compile_layer`; `deterministic` keeps its norms eager), and what the compiled
    graph saves is counted."""
    from transformers import AutoModelForCausalLM

    from qfsdp.model import decoder_layers

    one = copy.deepcopy(config)
    text = one.get_text_config()
    text.num_hidden_layers = 1
    if isinstance(getattr(text, "layer_types", None), list):
        text.layer_types = text.layer_types[:1]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(one, attn_implementation=attn_implementation)
    model.to(dtype)
    decoder = model.get_decoder()
    embedding = model.get_input_embeddings()
    for child in decoder.children():
        if child is not embedding:
            child.to_empty(device=device)
    layer = decoder_layers(model)[0]
    if not isinstance(layer, GradientCheckpointingLayer):  # auto would have no way to leave it out of checkpointing
        raise ValueError(f"{type(layer).__name__} has no per-layer checkpointing switch "
                         f"(transformers' GradientCheckpointingLayer)")
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved: dict[int, int] = {}
    inside, alive = [], []

    def pack(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if inside and storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        # Held here until the forward ends, as autograd would hold it (so no address is reused and counted twice),
        # but not handed back: no backward runs, and an op's own output handed back would form a reference cycle
        # through the graph that Python cannot collect, keeping the layer allocated.
        alive.append(t)

    # Eager even around a compiled layer: compiled code would apply them to `inside` only after its graph ran.
    pre = layer.register_forward_pre_hook(torch.compiler.disable(lambda *_: inside.append(True)))
    post = layer.register_forward_hook(torch.compiler.disable(lambda *_: inside.clear()))
    if compiled:
        from qfsdp.shard import compile_layer

        compile_layer(layer, checkpointed=False, deterministic=deterministic)
    try:
        x = torch.randn(1, tokens, text.hidden_size, dtype=dtype, device=device, requires_grad=True)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None), \
                torch.autocast(device.type, dtype=dtype, enabled=autocast):
            out = decoder(inputs_embeds=x, use_cache=False)
        del out
    finally:
        pre.remove()
        post.remove()
        alive.clear()
        del model, decoder, embedding, layer
        if compiled:  # its compiled code fits no layer of the model (theirs have LoRA, 4-bit weights): spare the
            # model's compile the probe's cache entries and their guards
            torch.compiler.reset()
    return sum(saved.values()) / tokens


def row_length(cfg, longest: int | None) -> int | None:
    """The most tokens a training row can hold, which a micro batch is padded to: the longest row the trainer
    tokenized (`data.longest_row`), within `trainer.max_length`, which TRL truncates rows to. None: neither is
    known."""
    known = [n for n in (longest, cfg.trainer.max_length) if n is not None]
    return min(known) if known else None


def plan_checkpointing(cfg, device: torch.device, world_size: int, total_memory: float,
                       compiled: bool = False, longest: int | None = None) -> CheckpointPlan:
    """`auto`'s choice for this run on a GPU of `total_memory` bytes, one layer probed on `device`: see the module
    docstring. `compiled`: the layers run compiled (`compile`), so those that keep their activations are counted
    compiled too. `longest`: the data's longest tokenized row (None: `trainer.max_length` tokens)."""
    from qfsdp.model import load_config
    from qfsdp.validate import memory_need

    config = load_config(cfg.model)
    text = config.get_text_config()
    dtype = getattr(torch, cfg.precision.dtype)
    layers = text.num_hidden_layers
    micro_batch, row = cfg.trainer.per_device_train_batch_size, row_length(cfg, longest)
    tokens = micro_batch * row

    def probe(**compile_as) -> float:
        return tokens * saved_bytes_per_token(config, dtype, device, cfg.model.attn_implementation, tokens=row,
                                              autocast=bool(cfg.precision.loss_scaling), **compile_as)

    layer = probe()
    layer_input = tokens * text.hidden_size * dtype.itemsize
    need = memory_need(cfg, world_size)
    layer_weights = need.sharded_weights / layers  # with the embeddings' share: errs high
    # FSDP2 gathers a unit and prefetches the next when it shards or offloads; full fine-tuning also holds one
    # unit's unsharded float32 gradients before they are reduce-scattered.
    gathered = 2 * cfg.fsdp2.layers_per_unit * layer_weights if need.shard_size > 1 or cfg.fsdp2.offload else 0
    if not cfg.lora.enabled and need.shard_size > 1:
        gathered += cfg.fsdp2.layers_per_unit * need.trained / 16 / layers * 4
    if cfg.fsdp2.offload:  # frozen shards live in CPU memory; the head and embedding are gathered when used
        weights = need.unquantized + need.trained / need.shard_size
    else:
        weights = need.per_gpu
    ffn = getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None) or 4 * text.hidden_size
    transients = 2 * max(ffn, text.hidden_size) * text.hidden_size * dtype.itemsize + tokens * text.hidden_size * 16
    fixed = weights + gathered + layers * layer_input + layer + transients
    limit = min(total_memory, cfg.gpu_memory_limit_gib * GIB if cfg.gpu_memory_limit_gib is not None else math.inf)
    budget = RESERVED_SLACK * limit - OUTSIDE_ALLOCATOR
    count = checkpointed_count(layers, fixed, layer, layer_input, budget)
    kept = layer
    # Compiling the probe costs start-up time (planning took ~17 s at 8B on an H200): only where the eager count
    # leaves some layer recomputing.
    probe_compiled = compiled and count > 0
    if probe_compiled:
        kept = probe(compiled=True, deterministic=bool(cfg.deterministic))
        count = checkpointed_count(layers, fixed, kept, layer_input, budget)
    return CheckpointPlan(layers, count, budget, fixed, layer, layer_input, kept, probe_compiled, row)


def unplannable(cfg, longest: int | None = None) -> str | None:
    """Why `auto` cannot plan this run (every layer then recomputes), or None. The probe's layer is a plain layer
    in the compute dtype: LoRA's dropout masks, and float32 LoRA weights left unsharded (fsdp2=off, where PEFT casts
    each layer input to float32), keep ~1.5x what it counts. With activation offloading the plan's GPU arithmetic
    does not apply, and recomputing every layer is what pays (docs/design.md)."""
    if row_length(cfg, longest) is None:
        return "trainer.max_length=null and no tokenized rows: no row length"
    if not cfg.fsdp2.enabled:
        return "fsdp2=off"
    if cfg.lora.enabled and cfg.lora.lora_dropout > 0:
        return f"lora.lora_dropout={cfg.lora.lora_dropout}"
    if cfg.trainer.get("activation_offloading"):
        return "trainer.activation_offloading=true: only the layers' inputs are saved, on the host"
    return None


def resolve_checkpointed_layers(cfg, device: torch.device, world_size: int,
                                longest: int | None = None) -> tuple[int | None, CheckpointPlan | None]:
    """The count `shard.enable_checkpointing` gets (None: all layers), and `auto`'s plan where it made one. `longest`:
    the data's longest tokenized row (`data.longest_row`)."""
    value = cfg.fsdp2.checkpointed_layers
    if not cfg.fsdp2.activation_checkpointing or value in (None, "all"):
        return None, None
    if value != "auto":
        return int(value), None
    why = "no GPU memory to plan for" if device.type != "cuda" else unplannable(cfg, longest)
    if why is not None:
        logger.info("fsdp2.checkpointed_layers=auto: every decoder layer recomputes (%s)", why)
        return None, None
    try:
        compiled = compile_enabled(cfg, device.type) and getattr(cfg.kernels, "value", cfg.kernels) != "liger"
        plan = plan_checkpointing(cfg, device, world_size, torch.cuda.get_device_properties(device).total_memory,
                                  compiled=compiled, longest=longest)
    except Exception as e:  # an architecture the one-layer probe cannot build: the safe choice, said out loud
        logger.warning("fsdp2.checkpointed_layers=auto: every decoder layer recomputes, no plan could be made (%s: %s)",
                       type(e).__name__, e)
        return None, None
    if plan.peak > plan.budget:
        logger.warning("%s: over the budget even with every layer recomputing; a smaller micro batch, more GPUs or "
                       "fsdp2=offload would fit", plan.describe())
    else:
        logger.info(plan.describe())
    return plan.checkpointed, plan
