"""Training data: the bundled sample, OIG unified_chip2, a local JSON-lines file, or synthetic token ids."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qfsdp.config import DatasetConfig

SAMPLE_PATH = Path(__file__).parent / "data" / "sample.jsonl"


class DatasetError(ValueError):
    pass


def check_jsonl(path: str | Path, text_field: str) -> None:
    """Fail fast (before any weights load) on a missing or empty file, or one without usable text."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DatasetError(f"dataset file {str(p)!r} does not exist; set dataset.path to an existing .jsonl file")
    lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise DatasetError(f"dataset file {str(p)!r} is empty; it needs one JSON object per line")
    usable = 0
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(
                f"dataset file {str(p)!r} line {number} is not JSON ({e.msg}); fix or remove it") from None
        if isinstance(row, dict) and isinstance(row.get(text_field), str) and row[text_field].strip():
            usable += 1
    if usable == 0:
        keys = sorted({k for line in lines[:50] for k in json.loads(line)} if lines else [])
        raise DatasetError(
            f"dataset file {str(p)!r} has no non-empty text in field {text_field!r} (fields seen: {keys}); "
            f"set dataset.text_field to the field holding the text"
        )


def load_train_dataset(cfg: DatasetConfig, vocab_size: int, seed: int):
    """The training split as a `datasets.Dataset` with a `text` column, or `input_ids` for synthetic data."""
    import datasets

    if cfg.name == "synthetic":
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab_size, (cfg.num_samples, cfg.seq_length), generator=g)
        ds = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    else:
        if cfg.name == "sample":
            ds = datasets.load_dataset("json", data_files=str(SAMPLE_PATH), split="train")
        elif cfg.name == "jsonl" or (cfg.path and Path(cfg.path).expanduser().is_file()):
            ds = datasets.load_dataset("json", data_files=str(Path(cfg.path).expanduser()), split="train")
        else:
            ds = datasets.load_dataset(cfg.path, data_files=cfg.data_files, split=cfg.split)
        ds = ds.filter(lambda row: isinstance(row.get(cfg.text_field), str) and bool(row[cfg.text_field].strip()))
        if cfg.text_field != "text":
            ds = ds.rename_column(cfg.text_field, "text")
        ds = ds.select_columns(["text"])
    if cfg.max_samples is not None:
        ds = ds.select(range(min(cfg.max_samples, len(ds))))
    return ds
