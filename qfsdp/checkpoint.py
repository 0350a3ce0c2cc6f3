"""Mid-run checkpoints (`trainer.save_strategy=steps`) and resuming from them (`resume=auto|PATH`).

`RUN/checkpoints/step-N/` holds:
- `dcp/`: the trained weights (LoRA, or every weight for full fine-tuning) and the optimizer state, written with
  `torch.distributed.checkpoint`: each rank writes its own shards, nothing is gathered, and a load at another world
  size reshards them. The frozen (4-bit) base is not saved: it is reloaded from `model.path`;
- `adapter/`: the LoRA adapter in PEFT format (gathered collectively, as at the end of a run), for plain PEFT;
- Trainer's own files: `trainer_state.json` (step, log history, tokens seen), `scheduler.pt`, `scaler.pt` (fp16 on
  GPUs), `rng_state_<rank>.pth` (every rank's RNG states; `rng_state.pth` for one process);
- `config.yaml` (the composed config), `metrics.jsonl` (the rows up to this step);
- `checkpoint.json`, written last: the step, world size, what identifies the base, and every file with its size.

A save is atomic: Trainer writes it under `checkpoints/.saving/`, and rank 0 renames it to `step-N` once every rank
has written its part and `checkpoint.json` is there. A crash mid-save leaves the previous checkpoints as they were.

Resuming goes through Trainer's own `resume_from_checkpoint` path (TrainerState, skipping the batches already
consumed, RNG states, scheduler, scaler); `CheckpointingTrainer` replaces only the parts that would gather the
model or save one rank's shards as if they were the whole (transformers saves the optimizer with `torch.save` on
rank 0, accelerate#4206's silent failure mode). Trainer counts the data position in optimizer steps of
`global_batch_size` sequences, so it is the same at any world size.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from enum import Enum
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qfsdp.validate import ConfigError

CHECKPOINTS = "checkpoints"
SAVING = ".saving"
MANIFEST = "checkpoint.json"
DCP_DIR = "dcp"
ADAPTER_DIR = "adapter"
METRICS = "metrics.jsonl"
SAVE_STRATEGIES = ("no", "steps")

# What a resumed run must share with its checkpoint, and how to say so. Each entry: config keys, why they matter.
_SAME_BASE = "checkpoints hold only the trained weights; the frozen base is reloaded from model.path"
_SAME_DATA = "the checkpoint's data position refers to this data order"
MUST_MATCH = [
    (("model.path", "model.random_init", "model.random_checkpoint", "model.architecture", "quant.enabled", "quant.quant_type",
      "quant.double_quant"), _SAME_BASE),
    (("lora.enabled", "lora.r", "lora.lora_alpha", "lora.target_modules", "lora.bias"),
     "the checkpoint's trained weights have this shape"),
    (("trainer.global_batch_size",), "the data position is counted in optimizer steps of that many sequences; "
                                     "change world_size or per_device_train_batch_size instead"),
    (("seed", "dataset"), _SAME_DATA),
]


# ---- layout ----

def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_of(path: Path) -> int | None:
    name = Path(path).name
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def step_dirs(run_dir: Path) -> list[Path]:
    """The run's `step-N` directories, oldest first (complete or not)."""
    root = checkpoints_dir(run_dir)
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None] if root.is_dir() else []
    return sorted(found, key=step_of)


def incomplete_reason(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None when it is."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"it has no {MANIFEST} (written last: its save did not finish, or it is no qfsdp checkpoint)"
    files = json.loads(manifest.read_text())["files"]
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes where {size} were written"
    return None


def newest_complete(run_dir: Path) -> Path | None:
    complete = [p for p in step_dirs(run_dir) if incomplete_reason(p) is None]
    return complete[-1] if complete else None


def manifest(path: Path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


def is_interrupted_run(run_dir: Path) -> bool:
    """Training output without summary.json: a run that stopped before its end (or is running)."""
    from qfsdp.rundir import is_finished

    run_dir = Path(run_dir)
    return not is_finished(run_dir) and ((run_dir / METRICS).exists() or checkpoints_dir(run_dir).exists())


def interrupted_run_error(run_dir: Path) -> str:
    newest = newest_complete(run_dir)
    where = f"its newest complete checkpoint is {newest.name}" if newest else "it has no complete checkpoint"
    return (f"{run_dir} holds an unfinished run ({where}); continue it with resume=auto (which starts it over when "
            f"there is no checkpoint), or choose another directory with hydra.run.dir=...")


# ---- resuming: which checkpoint, and whether this config may continue it ----

def resolve_resume(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint this run continues: None for a fresh start. Raises ConfigError (one line) for a `resume` that
    names no complete checkpoint, or a config that cannot continue it."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        path = newest_complete(run_dir)
    else:
        path = Path(cfg.resume).expanduser()
        if not path.is_dir():
            raise ConfigError(f"resume={cfg.resume} does not exist; give a checkpoint directory "
                              f"(RUN/{CHECKPOINTS}/step-N), a run directory, or resume=auto")
        if step_of(path) is None and checkpoints_dir(path).is_dir():  # a run directory: its newest checkpoint
            newest = newest_complete(path)
            if newest is None:
                raise ConfigError(f"resume={cfg.resume} is a run directory without a complete checkpoint; give "
                                  f"one with resume=PATH, or start fresh without resume")
            path = newest
        reason = incomplete_reason(path)
        if reason is not None:
            newest = newest_complete(path.parent.parent) if path.parent.name in (CHECKPOINTS, SAVING) else None
            hint = f"resume={newest}" if newest else "another checkpoint"
            raise ConfigError(f"resume={cfg.resume} is not a complete checkpoint: {reason}; use {hint} "
                              f"(or resume=auto: the newest complete one in the run directory)")
    if path is not None:
        check_compatible(cfg, path)
        if step_of(path) >= cfg.trainer.max_steps:
            raise ConfigError(f"resume: {path} is at step {step_of(path)} and trainer.max_steps="
                              f"{cfg.trainer.max_steps} leaves nothing to train; raise trainer.max_steps to go on")
    return path


def check_compatible(cfg: DictConfig, path: Path) -> None:
    """Refuse, before any weights load, a config that would continue `path` silently wrong."""
    saved = OmegaConf.load(Path(path) / "config.yaml")
    for keys, why in MUST_MATCH:
        for key in keys:
            old, new = _value(saved, key), _value(cfg, key)
            if old != new:
                raise ConfigError(f"resume: {path} was trained with {key}={_show(old)} but this run has "
                                  f"{key}={_show(new)}; resume with {key}={_show(old)} ({why})")
    recorded = manifest(path).get("base_fingerprint")
    current = base_fingerprint(cfg)
    if recorded and current and recorded != current:
        raise ConfigError(f"resume: the weights at model.path={cfg.model.path} differ from those {path} was trained "
                          f"on (their fingerprint changed); resume with the same base weights ({_SAME_BASE})")


def _value(cfg: DictConfig, key: str):
    """The value as the saved config.yaml holds it (enums by name), so a loaded config compares with a composed one."""
    value = OmegaConf.select(cfg, key)
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True, enum_to_str=True)
    return value.name if isinstance(value, Enum) else value


def _show(value) -> str:
    """As an override would spell it: model.path=tiny, fsdp2.offload=true, model.architecture=null."""
    return value if isinstance(value, str) else json.dumps(value)


def changed_settings(cfg: DictConfig, path: Path) -> list[str]:
    """`key: old -> new` for every other setting this run changes against its checkpoint (world size, offload...)."""
    saved = _flatten(OmegaConf.to_container(OmegaConf.load(Path(path) / "config.yaml"), resolve=True))
    now = _flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    return [f"{k}: {_show(saved.get(k))} -> {_show(now.get(k))}" for k in sorted(saved.keys() | now.keys())
            if k != "resume" and saved.get(k) != now.get(k)]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def base_fingerprint(cfg: DictConfig) -> str | None:
    """A hash of the base model's files where they are on this machine (a local directory, the tiny models, a hub
    id already in the hub cache), else None. Files up to 64 MiB are hashed whole; larger ones by their size and 256
    blocks of 64 KiB spread over them (any fine-tune of a base changes nearly every block), so an 8B checkpoint costs
    a 64 MiB read. Random-weight models (model.random_init) are fixed by their architecture: None."""
    if cfg.model.random_init:
        return None
    directory = _local_model_dir(cfg.model)
    if directory is None:
        return None
    files = sorted(p for p in directory.iterdir() if p.is_file() and (
        p.suffix in (".safetensors", ".bin") or p.name == "config.json"))
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}\n".encode())
        with f.open("rb") as fh:
            if size <= 64 * 2**20:
                h.update(fh.read())
                continue
            block, blocks = 64 * 2**10, 256
            for i in range(blocks):
                fh.seek((size - block) * i // (blocks - 1))
                h.update(fh.read(block))
    return h.hexdigest()


def _local_model_dir(model_cfg) -> Path | None:
    from qfsdp.model import resolve_path

    path = Path(resolve_path(model_cfg))
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_cfg.path, local_files_only=True))
    except Exception:  # not in the hub cache (or not a hub id): nothing local to hash
        return None


def check_save_settings(cfg: DictConfig) -> None:
    t = cfg.trainer
    if t.save_strategy not in SAVE_STRATEGIES:
        raise ConfigError(f"trainer.save_strategy={t.save_strategy} is not supported; use trainer.save_strategy=steps "
                          f"(with trainer.save_steps=N) or no")
    if t.save_strategy == "steps" and t.save_steps <= 0:
        raise ConfigError(f"trainer.save_steps={t.save_steps} must be positive: a checkpoint every N optimizer steps "
                          f"(or a fraction of max_steps below 1); use e.g. trainer.save_steps=100")
    if t.save_total_limit is not None and t.save_total_limit < 1:
        raise ConfigError(f"trainer.save_total_limit={t.save_total_limit} must be at least 1 (checkpoints kept), or "
                          f"null to keep them all")


# ---- the Trainer side ----

def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Only what training changes: the frozen base is reloaded from model.path. Not strict, since the frozen keys are
    # absent by design; dcp.load already fails on any trained key the checkpoint lacks.
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _trained_state(model, state: dict) -> dict:
    """The trained parameters of a model state dict. bitsandbytes adds its quantization statistics to the state dict
    of an unsharded 4-bit layer (`...weight.absmax`): frozen, but not parameters, so `ignore_frozen_params` keeps
    them."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trained}


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class CheckpointingTrainer:
    """Mixed in before TRL's SFTTrainer (train.py). `setup_checkpointing` must be called before `train()`."""

    def setup_checkpointing(self, run_dir: Path, cfg: DictConfig, is_main: bool, on_save) -> None:
        """`on_save(step, fields)` reports a save's time and size (metrics.MetricsCallback.record_checkpoint)."""
        self._qfsdp = dict(run_dir=Path(run_dir), cfg=cfg, is_main=is_main, on_save=on_save, fingerprint=None)

    def _torch_optimizer(self):
        # accelerate's wrapper: its step() and state_dict() go through the scaler and device placement
        return getattr(self.optimizer, "optimizer", self.optimizer)

    # Trainer writes every checkpoint under RUN/checkpoints/.saving/, which _save_checkpoint then renames.
    def _get_output_dir(self, trial) -> str:
        return str(checkpoints_dir(self._qfsdp["run_dir"]) / SAVING)

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        start = time.perf_counter()
        q = self._qfsdp
        saving = Path(self._get_output_dir(trial))
        written = saving / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"  # where Trainer writes it
        if q["is_main"]:
            shutil.rmtree(saving, ignore_errors=True)  # what a save that did not finish left
            written.mkdir(parents=True)
        _barrier()
        # Trainer writes the adapter (save_model) and trainer_state.json; save_only_model (train.sft_config) keeps
        # it from writing the rest, done here instead.
        super()._save_checkpoint(model, trial)
        self._save_optimizer_and_scheduler(str(written))
        self._save_scaler(str(written))
        self._save_rng_state(str(written))
        _barrier()  # every rank has written its files
        if q["is_main"]:
            self._commit(written, start)
        _barrier()

    def _commit(self, written: Path, start: float) -> None:
        """Rank 0: config, metrics and checkpoint.json (last), then the rename that makes the checkpoint visible."""
        q = self._qfsdp
        step = self.state.global_step
        final = checkpoints_dir(q["run_dir"]) / f"step-{step}"
        (written / "config.yaml").write_text(OmegaConf.to_yaml(q["cfg"], resolve=True))
        if q["fingerprint"] is None:
            q["fingerprint"] = base_fingerprint(q["cfg"]) or ""
        stats = {"checkpoint": f"{CHECKPOINTS}/{final.name}", "save_s": round(time.perf_counter() - start, 3),
                 "save_bytes": _tree_bytes(written)}
        rows = q["on_save"](step, stats)
        (written / METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
        info = {"step": step, "world_size": self.args.world_size, "base_fingerprint": q["fingerprint"] or None,
                **stats, "files": {p.relative_to(written).as_posix(): p.stat().st_size
                                   for p in sorted(written.rglob("*")) if p.is_file()}}
        tmp = written / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(info, indent=1) + "\n")
        tmp.rename(written / MANIFEST)
        if final.exists():  # the same step saved before, by a run resumed from an earlier checkpoint
            shutil.rmtree(final)
        written.rename(final)
        written.parent.rmdir()  # .saving, empty again
        self._rotate(final)

    def _rotate(self, newest: Path) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        complete = [p for p in step_dirs(self._qfsdp["run_dir"]) if incomplete_reason(p) is None and p != newest]
        for old in complete[:max(0, len(complete) + 1 - limit)]:
            shutil.rmtree(old, ignore_errors=True)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not _internal_call:
            return super().save_model(output_dir, _internal_call)
        # Inside a checkpoint: the LoRA adapter in PEFT format, gathered collectively (every rank calls this);
        # full fine-tuning's weights are in dcp/ only.
        if not self._qfsdp["cfg"].lora.enabled:
            return None
        from qfsdp.artifacts import full_state_dict

        state = full_state_dict(self.model, trainable_only=True, keep=self._qfsdp["is_main"])
        if self._qfsdp["is_main"]:
            self.model.save_pretrained(Path(output_dir) / ADAPTER_DIR, state_dict=state)
        return None

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self._torch_optimizer(), options=_options())
        dcp.save({"model": _trained_state(self.model, model_state), "optim": optim_state},
                 checkpoint_id=Path(output_dir) / DCP_DIR)
        if self.args.should_save:
            from transformers.trainer import SCHEDULER_NAME

            torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_NAME)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        state = _trained_state(self.model, get_model_state_dict(self.model, options=_options()))
        dcp.load({"model": state}, checkpoint_id=Path(resume_from_checkpoint) / DCP_DIR)
        set_model_state_dict(self.model, state, options=_options())

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
        from transformers.trainer import SCHEDULER_NAME

        optim = self._torch_optimizer()
        state = get_optimizer_state_dict(self.model, optim, options=_options())  # creates empty Adam state to fill
        dcp.load({"optim": state}, checkpoint_id=Path(checkpoint) / DCP_DIR)
        set_optimizer_state_dict(self.model, optim, state, options=_options())
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / SCHEDULER_NAME, weights_only=True))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        # One RNG state per rank: at another world size there is no state that belongs to this rank.
        if checkpoint is not None and manifest(checkpoint)["world_size"] == self.args.world_size:
            super()._load_rng_state(checkpoint)

    def _init_training_state(self, max_steps, *args, **kwargs):
        result = super()._init_training_state(max_steps, *args, **kwargs)
        # The checkpoint's TrainerState brings its own logging and save intervals; this run's config wins.
        self.state.compute_steps(self.args, max_steps)
        return result


def checkpoint_rows(path: Path) -> list[dict]:
    """metrics.jsonl rows up to the checkpoint's step."""
    text = (Path(path) / METRICS).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def restart_metrics(run_dir: Path, rows: list[dict]) -> None:
    """Rank 0 of a resumed (or restarted) run: metrics.jsonl holds the checkpoint's rows and nothing after them."""
    tmp = Path(run_dir) / (METRICS + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, Path(run_dir) / METRICS)
