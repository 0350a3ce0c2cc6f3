"""A model to deploy from a run: the LoRA adapter merged into the base weights, or the adapter alone.

    python -m qfsdp.export RUN_DIR OUT                        # merged model: safetensors, config, tokenizer
    python -m qfsdp.export RUN_DIR --checkpoint step-N OUT    # the same from a checkpoint of the run
    python -m qfsdp.export RUN_DIR --adapter-only OUT         # the PEFT adapter and a README

The merged model is what training computed, without 4-bit layers: each base weight as training used it (cast to
the run's compute dtype; for a layer that trained in 4-bit, dequant(NF4(W)), quantized by bitsandbytes with the
run's settings, or as saved for a checkpoint stored in 4-bit), plus scale * B @ A, summed in float32 and cast to the
run's precision (or --dtype). A full fine-tuning run's model is cast likewise. The base checkpoint is read one
tensor at a time (safetensors' memory map) into output shards written by safetensors: memory holds about one output
shard (--max-shard-size) plus one tensor, never the whole model, and no GPU is needed (one is used for the 4-bit
work when present).
See docs/export.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from qfsdp.hostmem import PeakAnon, peak_rss_bytes
from qfsdp.rundir import SUMMARY
from qfsdp.tiny import TINY_ARCHITECTURES

_DTYPES = ("float32", "bfloat16", "float16")
_QUANT_STATE = re.compile(r"\.quant_state\.bitsandbytes__(nf4|fp4)$")
_QUANT_AUX = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")


class ExportError(ValueError):
    """A bad input, reported as one line (exit code 2)."""


# --------------------------------------------------------------------------------------------------- the run


@dataclass
class Run:
    dir: Path
    cfg: DictConfig
    checkpoint: str | None
    trained: Path  # the PEFT adapter directory, or the full fine-tuned model's
    steps: int
    losses: list[float]

    @property
    def adapter(self) -> bool:
        return bool(self.cfg.lora.enabled)


def load_run(run_dir: Path, checkpoint: str | None) -> Run:
    """The run's config and trained weights, checked: a finished run, or an existing checkpoint of any run."""
    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        raise ExportError(f"{run_dir} is not a qfsdp run directory (no .hydra/config.yaml)")
    cfg = OmegaConf.load(config)
    kind = "adapter" if cfg.lora.enabled else "model"
    if checkpoint is None:
        if not (run_dir / SUMMARY).is_file():
            hint = f"; export one of its checkpoints with --checkpoint ({', '.join(_checkpoints(run_dir))})" \
                if _checkpoints(run_dir) else ""
            raise ExportError(f"{run_dir} is not a finished run (no {SUMMARY}){hint}")
        trained, summary = run_dir / kind, json.loads((run_dir / SUMMARY).read_text())
        steps, losses = summary["steps"], summary.get("losses") or [summary["final_loss"]]
    else:
        if not re.fullmatch(r"step-\d+", checkpoint):
            raise ExportError(f"--checkpoint {checkpoint}: expected a name like step-100")
        trained = run_dir / "checkpoints" / checkpoint / kind
        if not trained.is_dir():
            have = ", ".join(_checkpoints(run_dir)) or "none"
            raise ExportError(f"{run_dir} has no checkpoint {checkpoint} with {kind}/ (checkpoints: {have})")
        steps = int(checkpoint.removeprefix("step-"))
        losses = [r["loss"] for r in _metrics(run_dir) if r["step"] <= steps]
    if not trained.is_dir():
        raise ExportError(f"{run_dir} has no {kind}/ directory: its trained weights are missing")
    return Run(run_dir, cfg, checkpoint, trained, steps, losses)


def _checkpoints(run_dir: Path) -> list[str]:
    found = (run_dir / "checkpoints").glob("step-*")
    return [p.name for p in sorted(found, key=lambda p: int(p.name.removeprefix("step-")))
            if p.name.removeprefix("step-").isdigit()]


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty; qfsdp.export never overwrites: choose another OUT")


def compute_dtype(run: Run) -> torch.dtype:
    return getattr(torch, run.cfg.precision.dtype)


# --------------------------------------------------------------------------------------------- the base model


def base_checkpoint(run: Run) -> Path:
    """The directory of the weights training started from (for full fine-tuning: the trained model itself)."""
    from qfsdp.config import ModelConfig
    from qfsdp.model import random_checkpoint_path, resolve_path

    if not run.adapter:
        return run.trained
    model_cfg = ModelConfig(**OmegaConf.to_container(run.cfg.model, resolve=True))
    if model_cfg.random_init:
        if not model_cfg.random_checkpoint:
            raise ExportError("the run's random-weight base was drawn on its devices and never saved (no checkpoint: "
                              "model.random_init=true); train with model.random_checkpoint=true to export one")
        # Rebuilding it elsewhere could give other random weights (it is built on a GPU where there is one).
        path = random_checkpoint_path(model_cfg, compute_dtype(run))
        if not (path / "config.json").is_file():
            raise ExportError(f"the run's random-weight base {path} is not in this machine's qfsdp cache "
                              "(QFSDP_CACHE): export where the run trained")
        return path
    path = resolve_path(model_cfg)
    return Path(path) if Path(path).is_dir() else _download(path)


def _download(repo_id: str) -> Path:
    """A hub model's config and weights (from the local cache when training already fetched them)."""
    from huggingface_hub import snapshot_download

    configs = ["config.json", "generation_config.json"]
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=[*configs, "*.safetensors", "*.safetensors.index.json"]))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(repo_id, allow_patterns=[*configs, "*.bin", "*.bin.index.json"]))
    except OSError as e:  # huggingface_hub's errors for no network, no such repo, no access
        raise ExportError(f"cannot get the base model {repo_id}: {str(e).splitlines()[0]}") from None
    return path


class Checkpoint:
    """A saved model's tensors, read one at a time through a memory map (safetensors, or pytorch_model*.bin)."""

    def __init__(self, directory: Path):
        self.directory = directory
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (directory / index).is_file():
                weight_map = json.loads((directory / index).read_text())["weight_map"]
                self.files = [directory / f for f in dict.fromkeys(weight_map.values())]
                break
        else:
            single = [directory / f for f in ("model.safetensors", "pytorch_model.bin") if (directory / f).is_file()]
            if not single:
                raise ExportError(f"{directory} holds no model weights (model.safetensors or pytorch_model.bin)")
            self.files = single[:1]
        self.where = {}
        for file in self.files:
            with self.read(file) as f:
                self.where.update((key, file) for key in f.keys())

    @staticmethod
    def read(file: Path):
        """A context manager giving `keys()` and `get_tensor(key)` for one file."""
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            # Tensors are views of the file's mapped pages: page cache the kernel can reclaim, not the process' own.
            return safe_open(str(file), framework="pt")
        return _PickledState(file)

    def get(self, key: str) -> torch.Tensor:
        with self.read(self.where[key]) as f:
            return f.get_tensor(key)


class _PickledState:
    """A pytorch_model*.bin file, memory-mapped while open."""

    def __init__(self, file: Path):
        self.file = file

    def __enter__(self) -> "_PickledState":
        self.state = torch.load(self.file, map_location="cpu", mmap=True, weights_only=True)
        return self

    def __exit__(self, *exc) -> None:
        del self.state

    def keys(self) -> list[str]:
        return list(self.state)

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.state[key]


def meta_model(config, trust_remote_code: bool):
    """The architecture without weights: its parameter names, tied weights and which linears quantized."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def weight_groups(model) -> list[set[str]]:
    """Every tensor a loadable checkpoint must hold, as sets of names sharing one tensor (tied weights)."""
    groups: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(name)
    params = {n for g in groups.values() for n in g}
    buffers = [{n} for n in model.state_dict() if n not in params]
    return [*groups.values(), *buffers]


def model_name(key: str, names: set[str], prefix: str) -> str | None:
    """The model's name for a checkpoint key; checkpoints of the bare model (OPT's) lack the `model.` prefix."""
    if key in names:
        return key
    if f"{prefix}.{key}" in names:
        return f"{prefix}.{key}"
    return None


# --------------------------------------------------------------------------------------------------- 4-bit


def quantized_like_training(weight: torch.Tensor, run: Run, device: torch.device) -> torch.Tensor:
    """dequant(NF4(W)) in float32, with W cast to the compute dtype and quantized with the run's settings by
    bitsandbytes, as training quantized it."""
    import bitsandbytes.functional as bnbf

    from qfsdp.model import bnb_config, params_4bit

    dtype = compute_dtype(run)
    p = params_4bit(weight.to(dtype), bnb_config(run.cfg.quant, dtype)).to(device)  # quantizes, as in training
    p.quant_state.dtype = torch.float32  # the dtype dequantize_4bit returns
    return bnbf.dequantize_4bit(p.data, p.quant_state).cpu()


def dequantize_saved(key: str, packed: torch.Tensor, ckpt: Checkpoint, device: torch.device) -> torch.Tensor:
    """A weight saved in bitsandbytes 4-bit (packed bytes and quant state beside it), dequantized to float32."""
    import bitsandbytes.functional as bnbf

    parts = {k.removeprefix(key + "."): ckpt.get(k) for k in ckpt.where if k.startswith(key + ".")}
    state = bnbf.QuantState.from_dict(parts, device)
    state.dtype = torch.float32  # the dtype dequantize_4bit returns
    return bnbf.dequantize_4bit(packed.to(device), state).cpu()


def _is_quant_aux(key: str) -> bool:
    return bool(_QUANT_STATE.search(key)) or key.endswith(_QUANT_AUX)


# ---------------------------------------------------------------------------------------------------- LoRA


class Lora:
    """A PEFT LoRA adapter as per-module deltas scale * B @ A, plus any base tensors it trained (`lora.bias`)."""

    def __init__(self, adapter_dir: Path):
        from peft import LoraConfig
        from peft.utils.other import get_pattern_key
        from safetensors.torch import load_file

        self.config = LoraConfig.from_pretrained(str(adapter_dir))
        if self.config.use_dora or getattr(self.config, "lora_bias", False) or self.config.modules_to_save:
            raise ExportError(f"{adapter_dir}: only plain LoRA merges here (no DoRA, lora_bias or modules_to_save)")
        state = load_file(adapter_dir / "adapter_model.safetensors")
        self.a, self.b, self.replace = {}, {}, {}
        for key, t in state.items():
            name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
            if name.endswith(".lora_A.weight"):
                self.a[name.removesuffix(".lora_A.weight")] = t
            elif name.endswith(".lora_B.weight"):
                self.b[name.removesuffix(".lora_B.weight")] = t
            elif "lora_" in name:
                raise ExportError(f"{adapter_dir}: adapter tensor {key} is not plain LoRA; cannot merge it")
            else:
                self.replace[name] = t
        self.scale = {}
        for module in self.a:
            r = self.config.rank_pattern.get(get_pattern_key(self.config.rank_pattern, module), self.config.r)
            alpha = self.config.alpha_pattern.get(get_pattern_key(self.config.alpha_pattern, module),
                                                  self.config.lora_alpha)
            self.scale[module] = alpha / (r ** 0.5 if self.config.use_rslora else r)
        self.used: set[str] = set()

    def apply(self, name: str, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`tensor` (the base's `name`) with the adapter merged in, float32; unchanged when the adapter has no part."""
        if name in self.replace:
            self.used.add(name)
            return self.replace[name].float()
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or module not in self.a:
            return tensor
        self.used.add(name)
        delta = self.b[module].to(device, torch.float32) @ self.a[module].to(device, torch.float32)
        if self.config.fan_in_fan_out:
            delta = delta.T
        return (tensor.to(device, torch.float32) + self.scale[module] * delta).cpu()

    def targets(self) -> set[str]:
        return {f"{m}.weight" for m in self.a} | set(self.replace)


# ------------------------------------------------------------------------------------------------- writing


class ShardWriter:
    """Tensors in, safetensors shards out once `max_bytes` are held; file names and index as transformers writes them.
    Peak memory is about one shard: safetensors writes a file from tensors in memory."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.shard: dict[str, torch.Tensor] = {}
        self.storages: set[int] = set()
        self.shards: list[list[str]] = []
        self.total = self.held = self.largest = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.shard and self.held + size > self.max_bytes:
            self._flush()
        tensor = tensor.contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage and storage in self.storages:
            # a pickled checkpoint may keep tied weights in one storage, which save_file refuses
            tensor = tensor.clone()
        self.storages.add(tensor.untyped_storage().data_ptr())
        self.shard[name] = tensor
        self.held += size
        self.total += size
        self.largest = max(self.largest, self.held)

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.shard, self.out / f"shard-{len(self.shards)}.tmp", metadata={"format": "pt"})
        self.shards.append(list(self.shard))
        self.shard, self.storages, self.held = {}, set(), 0

    def finish(self) -> list[str]:
        """Name the shards (`model.safetensors`, or `model-0000i-of-0000n.safetensors` and the index)."""
        if not self.shard and not self.shards:
            raise ExportError("the base checkpoint holds no tensor of the model")
        if self.shard:
            self._flush()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            (self.out / f"shard-{i}.tmp").rename(self.out / name)
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {k: name for name, keys in zip(names, self.shards) for k in keys}}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


# ------------------------------------------------------------------------------------------------- exports


@dataclass
class Stats:
    tensors: int
    merged: int
    files: list[str]
    total_bytes: int
    largest_shard_bytes: int


def write_merged(run: Run, out: Path, dtype: torch.dtype, max_shard_bytes: int) -> Stats:
    """Stream the base checkpoint into `out`: each tensor dequantized like training, the adapter merged, cast."""
    from transformers import AutoConfig

    from qfsdp.model import bnb_config, linears_to_quantize

    base = base_checkpoint(run)
    config = AutoConfig.from_pretrained(base, trust_remote_code=run.cfg.model.trust_remote_code)
    model = meta_model(config, run.cfg.model.trust_remote_code)
    names = {n for g in weight_groups(model) for n in g}
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    ckpt = Checkpoint(base)
    prequantized = {k.rsplit(".quant_state.", 1)[0] for k in ckpt.where if _QUANT_STATE.search(k)}
    quantize = set()
    if run.adapter and run.cfg.quant.enabled and not prequantized:
        quantize = {f"{m}.weight" for m in linears_to_quantize(model, bnb_config(run.cfg.quant, compute_dtype(run)))}
    lora = Lora(run.trained) if run.adapter else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # checkpoint key -> the model's name; others are no tensor of the model (a quant state is read with its weight)
    keys = {k: n for k in ckpt.where if not _is_quant_aux(k) and (n := model_name(k, names, model.base_model_prefix))}
    writer, written = ShardWriter(out, max_shard_bytes), set()
    for file in ckpt.files:
        with ckpt.read(file) as f:
            for key in (k for k in f.keys() if k in keys):
                name, tensor = keys[key], f.get_tensor(key)
                if key in prequantized:
                    tensor = dequantize_saved(key, tensor, ckpt, device)
                elif name in quantize:
                    tensor = quantized_like_training(tensor, run, device)
                elif run.adapter and name in params and tensor.is_floating_point():
                    tensor = tensor.to(compute_dtype(run))  # frozen weights computed in it (shard.cast_frozen)
                if lora is not None:
                    tensor = lora.apply(name, tensor, device)
                writer.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
                written.add(name)
    files = writer.finish()
    _check_complete(model, written, lora)
    _write_config(config, base, out, dtype)
    return Stats(len(written), len(lora.used) if lora else 0, files, writer.total, writer.largest)


def _check_complete(model, written: set[str], lora: Lora | None) -> None:
    missing = [sorted(g)[0] for g in weight_groups(model) if not g & written]
    if missing:
        raise ExportError(f"the base checkpoint lacks {len(missing)} tensor(s) of {type(model).__name__} "
                          f"(e.g. {', '.join(missing[:3])}): its layout is not one qfsdp.export can map")
    unused = sorted(lora.targets() - lora.used) if lora else []
    if unused:
        raise ExportError(f"the adapter changes {len(unused)} tensor(s) the base checkpoint does not have "
                          f"(e.g. {', '.join(unused[:3])})")


def _write_config(config, base: Path, out: Path, dtype: torch.dtype) -> None:
    """The base's config as a plain model in `dtype`: no quantization, the KV cache on for generation."""
    for attr in ("quantization_config", "distributed_config"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = dtype
    config.use_cache = True
    config.save_pretrained(out)
    if (base / "generation_config.json").is_file():
        shutil.copy(base / "generation_config.json", out / "generation_config.json")


def write_tokenizer(run: Run, out: Path) -> None:
    from qfsdp.config import ModelConfig
    from qfsdp.model import load_tokenizer

    try:
        tokenizer = load_tokenizer(ModelConfig(**OmegaConf.to_container(run.cfg.model, resolve=True)))
    except OSError as e:  # transformers' error for a tokenizer neither local nor reachable
        raise ExportError(f"cannot load the run's tokenizer: {str(e).splitlines()[0]}") from None
    tokenizer.save_pretrained(out)


def write_adapter(run: Run, out: Path) -> None:
    """The PEFT adapter files as saved, and a README naming the base model, the LoRA settings and the losses."""
    if not run.adapter:
        raise ExportError(f"{run.dir} is a full fine-tuning run (lora=none): it has no adapter; "
                          "export the model without --adapter-only")
    for f in run.trained.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    (out / "README.md").write_text(adapter_readme(run))


def adapter_readme(run: Run) -> str:
    from peft import LoraConfig

    lora = LoraConfig.from_pretrained(str(run.trained))
    m, q = run.cfg.model, run.cfg.quant
    targets = lora.target_modules if isinstance(lora.target_modules, str) else sorted(
        {t.rsplit(".", 1)[-1] for t in lora.target_modules})
    base = f"`{m.path}`" + (" with random weights (model.random_init=true)" if m.random_init else "")
    local = m.random_init or m.path in TINY_ARCHITECTURES  # built by qfsdp, not loadable by name
    load_base = "BASE" if local else f'"{m.path}"'
    last = ", ".join(f"{x:.4f}" for x in run.losses[-5:])
    lines = [
        "# LoRA adapter trained with qfsdp", "",
        f"- base model: {base}",
        f"- base during training: {'NF4 4-bit' if q.enabled else 'unquantized'}"
        + (f" ({q.quant_type}, double quantization {'on' if q.double_quant else 'off'})" if q.enabled else "")
        + f", computing in {run.cfg.precision.dtype}",
        f"- LoRA: r={lora.r}, lora_alpha={lora.lora_alpha}, use_rslora={lora.use_rslora}, "
        f"lora_dropout={lora.lora_dropout}, bias={lora.bias}, target modules: {', '.join(targets)}",
        f"- steps: {run.steps}" + (f" (checkpoint {run.checkpoint})" if run.checkpoint else ""),
        f"- final loss: {run.losses[-1]:.4f} (last {min(5, len(run.losses))}: {last})" if run.losses
        else "- final loss: not recorded",
        f"- run: {run.dir.resolve()}", "",
        "Load it on its base model:", "",
        "    from peft import PeftModel",
        "    from transformers import AutoModelForCausalLM",
        f"    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({load_base}), ADAPTER_DIR)", "",
        "`python -m qfsdp.export RUN_DIR OUT` (without --adapter-only) writes the adapter merged into the base.", "",
    ]
    return "\n".join(lines)


def export(run_dir: Path, out: Path, checkpoint: str | None = None, adapter_only: bool = False,
           dtype: str | None = None, max_shard_bytes: int = 2 * 10**9) -> str:
    """Write the export into a fresh directory beside `out`, renamed to `out` once complete; returns the report."""
    start = time.perf_counter()
    anon = PeakAnon()
    run = load_run(run_dir, checkpoint)
    check_out(out)
    if adapter_only and not run.adapter:
        write_adapter(run, out)  # raises the full fine-tuning message
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        if adapter_only:
            write_adapter(run, tmp)
            report = f"adapter ({run.steps} steps) and README.md"
        else:
            target = getattr(torch, dtype) if dtype else compute_dtype(run)
            stats = write_merged(run, tmp, target, max_shard_bytes)
            write_tokenizer(run, tmp)
            what = f"merged {stats.merged} adapter tensor(s) into" if run.adapter else "cast"
            report = (f"{what} {stats.tensors} tensors, {stats.total_bytes / 2**20:.1f} MiB in "
                      f"{str(target).removeprefix('torch.')}, {len(stats.files)} shard(s), at most "
                      f"{stats.largest_shard_bytes / 2**20:.1f} MiB of tensors held at once")
        if out.exists():
            out.rmdir()  # empty (check_out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        anon.stop()
    peak = peak_rss_bytes() / 2**30
    source = f"{run_dir}" + (f" {checkpoint}" if checkpoint else "")
    own = f" ({anon.peak / 2**30:.2f} GiB its own, the rest mapped pages of the base checkpoint)" if anon.peak else ""
    return (f"qfsdp.export: {source} -> {out}: {report}; {time.perf_counter() - start:.1f}s, "
            f"peak RSS {peak:.2f} GiB{own}")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 2GB or 500MB")
    return int(float(m[1]) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m[2]])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qfsdp.export", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory (outputs/DATE/TIME)")
    p.add_argument("out", type=Path, metavar="OUT", help="new directory to write (must not exist or be empty)")
    p.add_argument("--checkpoint", metavar="step-N", help="export RUN_DIR/checkpoints/step-N instead of the end")
    p.add_argument("--adapter-only", action="store_true", help="copy the PEFT adapter and write a README stub")
    p.add_argument("--dtype", choices=_DTYPES, help="dtype of the merged weights (default: the run's precision)")
    p.add_argument("--max-shard-size", type=parse_size, default="2GB",
                   help="largest output file (default 2GB); peak memory is about one output shard")
    args = p.parse_args(argv)
    try:
        print(export(args.run_dir, args.out, args.checkpoint, args.adapter_only, args.dtype, args.max_shard_size),
              flush=True)
    except ExportError as e:
        print(f"qfsdp.export: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
