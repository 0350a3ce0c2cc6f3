"""Under torchrun: train with qfsdp's own code path and record the row length `auto` is handed to plan for, as
read off the trainer's tokenized dataset (`data.longest_row`), beside the longest row counted in Python.

usage: planned_row.py RUN_DIR [overrides...]; writes RUN_DIR/planned_row.json: {"arrow", "python", "planned"}
"""

import json
import sys
from pathlib import Path

import torch

from qfsdp import train
from qfsdp.config import compose_config
from qfsdp.data import longest_row
from qfsdp.distributed import init_distributed, shutdown_and_exit
from qfsdp.model import prepare_checkpoint

run_dir = Path(sys.argv[1])
run_dir.mkdir(parents=True, exist_ok=True)
cfg = compose_config(sys.argv[2:])
seen = {}


def recording_longest_row(dataset, multiple=None):
    seen["python"] = max(len(ids) for ids in dataset["input_ids"])
    seen["arrow"] = longest_row(dataset, multiple)
    return seen["arrow"]


resolve = train.resolve_checkpointed_layers


def recording_resolve(cfg, device, world_size, longest=None):
    seen["planned"] = longest
    return resolve(cfg, device, world_size, longest)


train.longest_row, train.resolve_checkpointed_layers = recording_longest_row, recording_resolve
prepare_checkpoint(cfg.model, getattr(torch, cfg.precision.dtype))
d = init_distributed()
train.run_training(cfg, run_dir, d)
if d.is_main:
    (run_dir / "planned_row.json").write_text(json.dumps(seen))
shutdown_and_exit(0)
