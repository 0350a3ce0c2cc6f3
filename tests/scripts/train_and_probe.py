"""Under torchrun: train with qfsdp's own code path, then save the trained (sharded) model's logits on a fixed
batch, so a test can compare them with the saved adapter reloaded into a plain PeftModel.

usage: train_and_probe.py RUN_DIR [overrides...]
"""

import sys
from pathlib import Path

import torch

from qfsdp.config import compose_config
from qfsdp.distributed import init_distributed, shutdown_and_exit
from qfsdp.model import prepare_checkpoint
from qfsdp.train import run_training

run_dir = Path(sys.argv[1])
run_dir.mkdir(parents=True, exist_ok=True)
cfg = compose_config(sys.argv[2:])

prepare_checkpoint(cfg.model, getattr(torch, cfg.precision.dtype))
d = init_distributed()
_, model = run_training(cfg, run_dir, d)  # the trained model, still sharded
model.eval()
ids = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(123))
with torch.no_grad():
    logits = model(input_ids=ids).logits.float()
if d.is_main:
    torch.save({"input_ids": ids, "logits": logits}, run_dir / "probe.pt")
shutdown_and_exit(0)
