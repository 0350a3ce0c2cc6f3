"""Worker entry point, one per rank: `python -m torch.distributed.run ... -m qfsdp.worker RUN_DIR`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def load_run_config(run_dir: Path) -> DictConfig:
    """The config the driver composed, checked again against the typed schema."""
    from qfsdp.config import Config

    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    return OmegaConf.merge(OmegaConf.structured(Config), saved)


def execute(cfg: DictConfig, run_dir: Path) -> None:
    """Train on this rank. Every rank must have composed the same config."""
    from qfsdp.distributed import env_rank
    from qfsdp.progress import log_to_run_log_only

    log_to_run_log_only(run_dir if env_rank() == 0 else None)  # before the libraries that warn are imported

    import torch

    from qfsdp.distributed import check_same_on_all_ranks, init_distributed
    from qfsdp.model import load_tokenizer, prepare_checkpoint
    from qfsdp.progress import quiet_library_progress_bars
    from qfsdp.train import run_training
    from qfsdp.validate import check_precision_on_device

    check_precision_on_device(cfg.precision.dtype)
    quiet_library_progress_bars()  # the training bar stays the only one
    if cfg.deterministic:
        # cuBLAS reads this when its first handle is created, so it is set before any GPU work.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    prepare_checkpoint(cfg.model, getattr(torch, cfg.precision.dtype), full_finetune=not cfg.lora.enabled)
    load_tokenizer(cfg.model)  # builds the tiny tokenizer if this model uses it
    d = init_distributed()
    if d.world_size > 1:
        check_same_on_all_ranks("the composed config", OmegaConf.to_yaml(cfg, resolve=True))
    switches = apply_device_settings(cfg, d.device)
    if cfg.deterministic and d.is_main:
        from qfsdp.progress import append_to_run_log

        append_to_run_log(run_dir, "deterministic=true: Inductor eager_numerics switches on: "
                                   + (", ".join(switches) or "none (this torch has none)"))
    run_training(cfg, run_dir, d)


def apply_device_settings(cfg: DictConfig, device) -> list[str]:
    """`deterministic` and `gpu_memory_limit_gib`, for this process. Returns the Inductor `eager_numerics` switches
    turned on (which this torch has; none without `deterministic`)."""
    import torch

    applied: list[str] = []
    if cfg.deterministic:
        # Strict: warn_only keeps non-deterministic kernels (cuDNN's attention backward) and only warns. Strict, sdpa
        # runs flash attention's deterministic backward, and an op without a deterministic kernel stops the run.
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        # compile=true: keep eager's rounding of every bfloat16/float16 intermediate, which Inductor otherwise skips
        # inside fused kernels (its documented switch for matching eager numerics). On CPU the compiled forward is
        # then bit-identical to eager (tests/test_parity.py), so compile on vs off compares like with like.
        import torch._inductor.config

        torch._inductor.config.emulate_precision_casts = True
        # Likewise eager's division (correctly rounded, where Triton's `/` is approximate: softmax, SiLU's sigmoid)
        # and denormals (eager keeps them, Triton flushes them to zero), where this torch has those switches.
        # Which ones this torch has goes into the run's log (torch 2.13 has both).
        numerics = getattr(torch._inductor.config, "eager_numerics", None)
        applied = [name for name in ("division_rounding", "disable_ftz") if hasattr(numerics, name)]
        for name in applied:
            setattr(numerics, name, True)
    if cfg.gpu_memory_limit_gib is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        # The caching allocator refuses allocations beyond this fraction: an out-of-memory error where a smaller
        # GPU would have one.
        torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.gpu_memory_limit_gib * 2**30 / total), device)
    return applied


def record_error(run_dir: Path, error: BaseException) -> None:
    """One line per failing rank, for the driver to report (and a sweep to record)."""
    rank = os.environ.get("RANK", "0")
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    (run_dir / f"error-rank{rank}.txt").write_text(f"rank {rank}: {type(error).__name__}: {first}\n")


def main() -> None:
    from qfsdp.distributed import shutdown_and_exit

    run_dir = Path(sys.argv[1])
    try:
        execute(load_run_config(run_dir), run_dir)
    except BaseException as e:
        record_error(run_dir, e)
        raise
    shutdown_and_exit(0)


if __name__ == "__main__":
    main()
