"""Training data in TRL's three formats, or synthetic token ids.

Formats (TRL's names): language modeling (`text`), conversational (`messages`: a list of {role, content}, rendered
with the tokenizer's chat template) and prompt-completion (`prompt`/`completion`, both text or both lists of
messages). Sources: the bundled samples (`sample`: text, `sample_chat`: conversations), a local file (.jsonl, .json,
.parquet), a directory saved with `datasets`, or a hub id. TRL's SFTTrainer then tokenizes, masks the loss (completion
only for prompt-completion data; assistant turns only with `trainer.assistant_only_loss`) and packs.

Every row is checked before any weights load (`check_rows`, `check_chat_template`, `check_training_flags`; local
data from validate.py in the driver, any data again in the worker), each problem one line naming the row and the fix.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from qfsdp.config import DatasetConfig

DATA_DIR = Path(__file__).parent / "data"
SAMPLE_PATH = DATA_DIR / "sample.jsonl"
SAMPLE_CHAT_PATH = DATA_DIR / "sample_chat.jsonl"
BUNDLED = {"sample": SAMPLE_PATH, "sample_chat": SAMPLE_CHAT_PATH}
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Columns TRL reads beside a format's own (tools for the chat template)
_EXTRA_COLUMNS = ("tools", "chat_template_kwargs")


class DatasetError(ValueError):
    pass


def _name(value: Any) -> str:
    """An enum knob's name (OmegaConf hands enum members, plain configs may hold strings)."""
    return value.name if isinstance(value, Enum) else str(value)


# -- where the rows come from ------------------------------------------------------------------------------------------


def is_synthetic(cfg: DatasetConfig) -> bool:
    return cfg.name == "synthetic"


def local_source(cfg: DatasetConfig) -> Path | None:
    """The file or directory the rows come from, when they are on this machine (None for a hub id)."""
    if cfg.name in BUNDLED:
        return BUNDLED[cfg.name]
    if cfg.path is None:
        return None
    p = Path(cfg.path).expanduser()
    looks_local = cfg.path.startswith(("/", "./", "../", "~")) or cfg.name in ("jsonl", "local")
    return p if p.exists() or looks_local else None


def describe_source(cfg: DatasetConfig) -> str:
    if cfg.name in BUNDLED:
        return f"dataset {cfg.name!r}"
    local = local_source(cfg)
    if local is not None:
        return f"dataset {'file' if not local.is_dir() else 'directory'} {str(local)!r}"
    return f"dataset {cfg.path!r}"


def _saved_with_datasets(p: Path) -> bool:
    return any((p / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _check_path(p: Path, where: str) -> None:
    if not p.exists():
        raise DatasetError(f"{where} does not exist; set dataset.path to an existing .jsonl, .json or .parquet file, "
                           f"or a directory saved with datasets")
    if p.is_file() and p.suffix not in _BUILDERS:
        raise DatasetError(f"{where} is a {p.suffix or 'suffix-less'} file; qfsdp reads .jsonl, .json and .parquet "
                           f"files, and directories saved with datasets")


def _jsonl_rows(p: Path, where: str) -> Iterator[tuple[str, dict]]:
    for number, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where} line {number} is not JSON ({e.msg}); fix or remove it") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{where} line {number} is a JSON {type(row).__name__}, not an object; each line "
                               f"needs one object such as {{\"text\": ...}} or {{\"messages\": [...]}}")
        yield f"line {number}", row


def load_source(cfg: DatasetConfig, eval_split: bool = False):
    """The rows as stored (a `datasets.Dataset`), before they are checked and put in TRL's format; with
    `eval_split`, those of `dataset.eval_split` instead of `dataset.split`."""
    import datasets

    split = cfg.eval_split if eval_split else cfg.split
    local = local_source(cfg)
    if eval_split and (local is None or not _saved_with_datasets(local)):
        try:
            return datasets.load_dataset(cfg.path if local is None else str(local), data_files=cfg.data_files,
                                         split=split)
        except ValueError as e:  # an unknown split: datasets names the ones there are
            raise DatasetError(f"dataset.eval_split={split}: {str(e).strip().splitlines()[0]}") from None
    if local is None:
        return datasets.load_dataset(cfg.path, data_files=cfg.data_files, split=split)
    if local.is_file():
        return datasets.load_dataset(_BUILDERS.get(local.suffix, "json"), data_files=str(local), split="train")
    if _saved_with_datasets(local):
        saved = datasets.load_from_disk(str(local))
        if eval_split and (not isinstance(saved, datasets.DatasetDict) or split not in saved):
            names = f"its splits are {', '.join(saved)}" if isinstance(saved, datasets.DatasetDict) else "it has none"
            raise DatasetError(f"dataset.eval_split={split} is not a split of {describe_source(cfg)} ({names}; a "
                               f"directory saved with datasets takes split names only)")
        return saved[split] if isinstance(saved, datasets.DatasetDict) else saved
    return datasets.load_dataset(str(local), data_files=cfg.data_files, split=split)


def check_eval_split_source(cfg: DatasetConfig) -> None:
    """`dataset.eval_split` needs a source with splits: not synthetic data, not one file."""
    if cfg.eval_split is None:
        return
    if is_synthetic(cfg):
        raise DatasetError(f"dataset.eval_split={cfg.eval_split}: dataset=synthetic has no splits; hold out "
                           f"examples with dataset.eval_samples=N or dataset.eval_fraction=F instead")
    local = local_source(cfg)
    if local is not None and not local.is_dir():
        raise DatasetError(f"dataset.eval_split={cfg.eval_split}: {describe_source(cfg)} is one file, without "
                           f"splits; hold out examples with dataset.eval_fraction=F or dataset.eval_samples=N instead")


def dataset_rows(ds) -> Iterator[tuple[str, dict]]:
    """(label, row) for each row of a `datasets.Dataset`, counting from 1 like a file's lines."""
    for number, row in enumerate(ds, 1):
        yield f"row {number}", row


def local_rows(cfg: DatasetConfig) -> Iterator[tuple[str, dict]]:
    """The rows of a local source, read for checking: JSON lines one by one (exact line numbers, and no schema
    unification hiding a row's own fields), anything else through `datasets`."""
    local = local_source(cfg)
    where = describe_source(cfg)
    _check_path(local, where)
    if local.suffix == ".jsonl":
        return _jsonl_rows(local, where)
    if local.suffix == ".json":
        try:
            rows = json.loads(local.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return _jsonl_rows(local, where)  # datasets reads JSON lines in a .json file too
        if isinstance(rows, list):
            return ((f"row {i}", r) for i, r in enumerate(rows, 1))
    return dataset_rows(load_source(cfg))


# -- formats and row checks --------------------------------------------------------------------------------------------

_DESCRIPTIONS = {
    "text": "language modeling ('{text_field}')",
    "messages": "conversational ('messages')",
    "prompt_completion": "prompt-completion ('prompt'/'completion')",
    "prompt_completion_chat": "conversational prompt-completion ('prompt'/'completion' as messages)",
    "tokens": "synthetic token ids",
}


def _normalized(row: dict) -> dict:
    """The row without null fields (datasets gives every row every column) and with ShareGPT-style
    `conversations` ({from, value}) as `messages` ({role, content}), which TRL converts the same way."""
    from trl.data_utils import maybe_convert_to_chatml

    row = {k: v for k, v in row.items() if v is not None}
    if isinstance(row.get("conversations"), list) and "messages" not in row:
        row = maybe_convert_to_chatml(json.loads(json.dumps(row)))
    return row


def row_format(row: dict, text_field: str) -> str | None:
    """TRL's format of one row, found from its fields in TRL's order (prompt-completion, conversational, text)."""
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "messages" in row:
        return "messages"
    if isinstance(row.get(text_field), str):
        return "text"
    return None


@dataclass
class Inspection:
    """What the rows turned out to be: their format, and for conversations the first one that uses each role."""

    where: str
    kind: str = ""  # a key of _DESCRIPTIONS
    text_field: str = "text"
    rows: int = 0
    role_examples: dict[str, tuple[str, list]] = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        return self.kind in ("messages", "prompt_completion_chat")

    def describe(self) -> str:
        return _DESCRIPTIONS[self.kind].format(text_field=self.text_field)


def _check_messages(messages: Any, where: str, label: str, what: str = "messages") -> None:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where} {label}: {what} must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and (isinstance(m.get("content"), str) or m.get("tool_calls"))):
            raise DatasetError(f"{where} {label}: {what}[{i}] is not a {{role, content}} object with text content "
                               f"(got {json.dumps(m)[:80]})")


def _has_assistant(messages: list) -> bool:
    return any(m["role"] == "assistant" for m in messages)


def _check_row(row: dict, kind: str, insp: Inspection, label: str) -> bool:
    """Check one row of format `kind`; False for a row to skip (empty text, as before formats were checked)."""
    where = insp.where
    if kind == "text":
        return bool(row[insp.text_field].strip())
    if kind == "messages":
        _check_messages(row["messages"], where, label)
        if not _has_assistant(row["messages"]):
            roles = ", ".join(dict.fromkeys(m["role"] for m in row["messages"]))
            raise DatasetError(f"{where} {label}: its messages have no assistant turn (roles: {roles}); each "
                               f"conversation needs an assistant message for the model to learn from")
        conversation = row["messages"]
    else:
        prompt, completion = row["prompt"], row["completion"]
        if not completion or isinstance(completion, str) and not completion.strip():
            raise DatasetError(f"{where} {label}: the completion is empty; every prompt needs a completion to learn "
                               f"(remove the row or fill it in)")
        if isinstance(completion, str) and isinstance(prompt, str):
            return True
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise DatasetError(f"{where} {label}: prompt and completion must both be text or both be lists of "
                               f"messages (prompt: {type(prompt).__name__}, completion: {type(completion).__name__})")
        _check_messages(prompt, where, label, "prompt")
        _check_messages(completion, where, label, "completion")
        if not _has_assistant(completion):
            raise DatasetError(f"{where} {label}: the completion has no assistant message; it is what the model "
                               f"learns to say")
        conversation = prompt + completion
    for m in conversation:
        insp.role_examples.setdefault(m["role"], (label, conversation))
    return True


def check_rows(rows: Iterable[tuple[str, dict]], cfg: DatasetConfig, where: str) -> Inspection:
    """Check every row: one format for all, each row whole; return what they are."""
    forced = _name(cfg.format)
    insp = Inspection(where=where, text_field=cfg.text_field)
    first: tuple[str, str] | None = None  # (label, kind) of the first row
    seen = 0
    for label, raw in rows:
        seen += 1
        row = _normalized(raw)
        fmt = row_format(row, cfg.text_field) if forced == "auto" else forced
        if fmt is None:
            raise DatasetError(
                f"{where} {label} is in none of TRL's formats: no non-empty text in field {cfg.text_field!r}, no "
                f"'messages', no 'prompt' with 'completion' (fields seen: {sorted(row)}); set dataset.text_field to "
                f"the field holding the text")
        needed = {"text": [cfg.text_field], "messages": ["messages"],
                  "prompt_completion": ["prompt", "completion"]}[fmt]
        if missing := [f for f in needed if f not in row]:
            raise DatasetError(f"{where} {label} has no {' or '.join(map(repr, missing))} (dataset.format={forced}; "
                               f"fields seen: {sorted(row)})")
        if fmt == "text" and not isinstance(row[cfg.text_field], str):
            raise DatasetError(f"{where} {label}: field {cfg.text_field!r} is not text")
        kind = "prompt_completion_chat" if fmt == "prompt_completion" and isinstance(row["completion"], list) else fmt
        if first is None:
            first = (label, kind)
            insp.kind = kind
        elif kind != insp.kind:
            raise DatasetError(
                f"{where} mixes formats: {first[0]} is {insp.describe()}, {label} is "
                f"{_DESCRIPTIONS[kind].format(text_field=cfg.text_field)}; keep one format per dataset")
        insp.rows += _check_row(row, kind, insp, label)
    if seen == 0:
        raise DatasetError(f"{where} is empty; it needs one example per row")
    if insp.rows == 0:
        raise DatasetError(f"{where} has no non-empty text in field {cfg.text_field!r}; set dataset.text_field to the "
                           f"field holding the text")
    return insp


# -- checks that need the tokenizer or the trainer settings ------------------------------------------------------------


def _template_from_file(path: str) -> str | None:
    p = Path(path).expanduser()
    return p.read_text(encoding="utf-8") if p.is_file() and p.suffix in (".jinja", ".j2") else None


def check_chat_template(insp: Inspection, tokenizer, tokenizer_name: str, trainer) -> None:
    """Conversational rows need a chat template that renders every role they use (and, for
    `assistant_only_loss`, one with `{% generation %}` markers, or one TRL has a training version of)."""
    if not insp.conversational:
        return
    template = tokenizer.chat_template
    if trainer.get("chat_template_path"):
        template = _template_from_file(trainer.chat_template_path)
        if template is None:
            return  # a tokenizer to copy the template from: TRL adds its tokens, nothing to check here
    if not template:
        raise DatasetError(
            f"{insp.where} is {insp.describe()} but the tokenizer of {tokenizer_name} has no chat template; set "
            f"model.tokenizer= to a tokenizer that has one (e.g. the instruct model's), or "
            f"trainer.chat_template_path=FILE.jinja")
    for role, (label, conversation) in insp.role_examples.items():
        try:
            rendered = tokenizer.apply_chat_template(conversation, tokenize=False, chat_template=template)
        except Exception as e:  # jinja's raise_exception and template errors alike
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DatasetError(f"the chat template of {tokenizer_name} cannot render {insp.where} {label} (role "
                               f"{role!r}): {first}") from None
        for m in conversation:
            content = m.get("content")
            if m["role"] == role and isinstance(content, str) and content.strip() and content.strip() not in rendered:
                raise DatasetError(
                    f"the chat template of {tokenizer_name} does not render role {role!r} ({insp.where} {label}): "
                    f"that message would be dropped; use the roles the template knows")
    if trainer.get("assistant_only_loss"):
        _check_generation_markers(tokenizer, template, tokenizer_name)


def _check_generation_markers(tokenizer, template: str, tokenizer_name: str) -> None:
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(template):
        return
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = template
        get_training_chat_template(tokenizer)
    except ValueError:
        raise DatasetError(
            f"trainer.assistant_only_loss=true needs a chat template that marks the assistant's tokens with "
            f"{{% generation %}}; the template of {tokenizer_name} has none and TRL has no training version of it; "
            f"set trainer.chat_template_path=FILE.jinja to a template with the markers") from None
    finally:
        tokenizer.chat_template = original


def check_training_flags(trainer, kind: str | None, where: str, ds: DatasetConfig, rows: int | None = None) -> None:
    """SFTConfig settings that only some data can honour (kind None: not known before the worker loads it);
    `rows`: how many examples there are, where known."""
    describe = _DESCRIPTIONS.get(kind, "").format(text_field="text")
    evaluates = _name(trainer.get("eval_strategy") or "no") != "no" or trainer.get("eval_on_start")
    chosen = eval_settings(ds)
    if len(chosen) > 1:
        raise DatasetError(f"{' and '.join(chosen)} are {'both' if len(chosen) == 2 else 'all'} set; choose one "
                           f"evaluation set: examples held out (dataset.eval_samples=N or dataset.eval_fraction=F) or "
                           f"a split (dataset.eval_split=NAME, e.g. validation[:200] for its first 200)")
    if evaluates and not chosen:
        raise DatasetError(f"evaluation (trainer.eval_strategy={trainer.get('eval_strategy')}, eval_on_start="
                           f"{bool(trainer.get('eval_on_start'))}) needs an evaluation set: hold out examples with "
                           f"dataset.eval_samples=N or dataset.eval_fraction=F, or name a split with "
                           f"dataset.eval_split=NAME")
    if ds.eval_samples < 0 or rows is not None and ds.eval_samples >= rows:
        raise DatasetError(f"dataset.eval_samples={ds.eval_samples} must be between 0 and the number of examples "
                           f"({rows if rows is not None else 'unknown'}) less one, so some are left to train on")
    f = ds.eval_fraction
    # datasets' train_test_split keeps floor((1 - f) * rows) examples to train on
    if f is not None and (not 0 < f < 1 or rows is not None and math.floor((1 - f) * rows) < 1):
        raise DatasetError(f"dataset.eval_fraction={f} must be between 0 and 1 (exclusive) and leave at least one of "
                           f"the {rows if rows is not None else 'unknown number of'} examples to train on")
    if kind is not None and trainer.get("assistant_only_loss") and kind not in ("messages", "prompt_completion_chat"):
        raise DatasetError(f"trainer.assistant_only_loss=true needs conversational data (messages of {{role, "
                           f"content}}) but {where} is {describe}")
    if kind is not None and trainer.get("completion_only_loss") and not kind.startswith("prompt_completion"):
        raise DatasetError(f"trainer.completion_only_loss=true needs prompt-completion data ('prompt'/'completion') "
                           f"but {where} is {describe}")
    if trainer.get("packing") and trainer.get("max_length") is None:
        raise DatasetError("trainer.packing=true needs trainer.max_length: the length of each packed sequence")
    if trainer.get("padding_free") and not trainer.get("packing") and trainer.get("max_length") is not None:
        raise DatasetError(
            f"trainer.padding_free=true without packing does not truncate (TRL), so it needs trainer.max_length=null "
            f"(data already short enough), or trainer.packing=true to cut sequences at "
            f"trainer.max_length={trainer.get('max_length')}")


def eval_settings(ds: DatasetConfig) -> list[str]:
    """The evaluation-set settings a config sets (at most one may be)."""
    return [name for name, on in (("dataset.eval_samples", ds.eval_samples != 0),
                                  ("dataset.eval_fraction", ds.eval_fraction is not None),
                                  ("dataset.eval_split", ds.eval_split is not None)) if on]


def _kept(rows: int, ds: DatasetConfig) -> int:
    return rows if ds.max_samples is None else min(rows, ds.max_samples)


def check_before_load(cfg, load_tokenizer) -> None:
    """The driver's checks (validate.py): every row of local data, and the trainer settings against it.
    `load_tokenizer()` gives the model's tokenizer, asked for only when the rows are conversations."""
    ds = cfg.dataset
    if is_synthetic(ds):
        if ds.seq_length < 2 or ds.num_samples < 1:
            raise DatasetError("dataset=synthetic needs dataset.seq_length >= 2 and dataset.num_samples >= 1")
        if _name(ds.lengths) == "lognormal" and (ds.median_length < 2 or ds.length_sigma < 0):
            raise DatasetError("dataset.lengths=lognormal needs dataset.median_length >= 2 and dataset.length_sigma "
                               ">= 0")
        check_training_flags(cfg.trainer, "tokens", "dataset=synthetic", ds, ds.num_samples)
        check_eval_split_source(ds)
        return
    if local_source(ds) is None:
        check_training_flags(cfg.trainer, None, describe_source(ds), ds)  # a hub dataset: the worker checks its rows
        return
    where = describe_source(ds)
    insp = check_rows(local_rows(ds), ds, where)
    check_training_flags(cfg.trainer, insp.kind, where, ds, _kept(insp.rows, ds))
    if ds.eval_split is not None:
        eval_split_rows(ds, insp.kind)
    if insp.conversational:
        try:
            tokenizer = load_tokenizer()
        except OSError:
            return  # not reachable from here (a hub tokenizer offline): loading reports it
        check_chat_template(insp, tokenizer, cfg.model.tokenizer or cfg.model.path, cfg.trainer)


def check_loaded(raw, cfg, tokenizer) -> None:
    """The worker's checks, on the rows as loaded (hub data is first seen here), before the model loads."""
    ds = cfg.dataset
    where = describe_source(ds)
    insp = check_rows(dataset_rows(raw), ds, where)
    check_training_flags(cfg.trainer, insp.kind, where, ds, _kept(insp.rows, ds))
    check_chat_template(insp, tokenizer, cfg.model.tokenizer or cfg.model.path, cfg.trainer)


# -- building the training set -----------------------------------------------------------------------------------------


def to_trl_format(raw, cfg: DatasetConfig):
    """Keep the columns of the rows' format, under TRL's names (`text`, `messages`, `prompt`/`completion`)."""
    from trl.data_utils import maybe_convert_to_chatml

    columns = raw.column_names
    if "conversations" in columns and "messages" not in columns:
        raw = raw.map(maybe_convert_to_chatml, remove_columns=["conversations"])
        columns = raw.column_names
    forced = _name(cfg.format)
    fmt = forced if forced != "auto" else row_format(_normalized(raw[0]), cfg.text_field)
    extra = [c for c in _EXTRA_COLUMNS if c in columns and fmt != "text"]
    if fmt == "messages":
        return raw.select_columns(["messages", *extra])
    if fmt == "prompt_completion":
        return raw.select_columns(["prompt", "completion", *extra])
    tf = cfg.text_field
    ds = raw.filter(lambda row: isinstance(row.get(tf), str) and bool(row[tf].strip()))
    if tf != "text":
        ds = ds.select_columns([tf]).rename_column(tf, "text")
    return ds.select_columns(["text"])


def synthetic_lengths(cfg: DatasetConfig, generator: torch.Generator) -> list[int]:
    """Sequence lengths: all `seq_length`, or log-normal around `median_length`, between 2 and `seq_length`."""
    if _name(cfg.lengths) == "fixed":
        return [cfg.seq_length] * cfg.num_samples
    normal = torch.randn(cfg.num_samples, generator=generator, dtype=torch.float64)
    lengths = (math.log(cfg.median_length) + cfg.length_sigma * normal).exp().round()
    return lengths.clamp(2, cfg.seq_length).long().tolist()


def synthetic_dataset(cfg: DatasetConfig, vocab_size: int, seed: int):
    import datasets

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (cfg.num_samples, cfg.seq_length), generator=g)
    lengths = synthetic_lengths(cfg, g)
    return datasets.Dataset.from_dict({"input_ids": [row[:n] for row, n in zip(ids.tolist(), lengths)]})


def eval_split_rows(cfg: DatasetConfig, kind: str | None = None):
    """The rows of `dataset.eval_split`, checked like the training rows and, given the training rows' `kind`, in
    the same format."""
    check_eval_split_source(cfg)
    raw = load_source(cfg, eval_split=True)
    where = f"{describe_source(cfg)} split {cfg.eval_split!r}"
    insp = check_rows(dataset_rows(raw), cfg, where)
    if kind is not None and insp.kind != kind:
        raise DatasetError(f"{where} is {insp.describe()} but the training split is "
                           f"{_DESCRIPTIONS[kind].format(text_field=cfg.text_field)}; evaluate on data of one format")
    return raw


def load_datasets(cfg: DatasetConfig, vocab_size: int, seed: int, raw=None):
    """(train, eval) as `datasets.Dataset`s in TRL's format (`text`, `messages` or `prompt`/`completion` columns),
    or `input_ids` for synthetic data. eval: `dataset.eval_split`, or examples held out with the seed
    (`eval_samples` of them, or the share `eval_fraction`; the same on every rank), or None. `raw`: the rows from
    `load_source`, if already loaded."""
    if is_synthetic(cfg):
        ds = synthetic_dataset(cfg, vocab_size, seed)
    else:
        ds = to_trl_format(load_source(cfg) if raw is None else raw, cfg)
    if cfg.max_samples is not None:
        ds = ds.select(range(min(cfg.max_samples, len(ds))))
    if cfg.eval_split is not None:
        evaluation = to_trl_format(eval_split_rows(cfg), cfg)
        if evaluation.column_names != ds.column_names:
            raise DatasetError(f"{describe_source(cfg)} split {cfg.eval_split!r} has columns "
                               f"{evaluation.column_names}, the training split {ds.column_names}; evaluate on data "
                               f"of one format")
        return ds, evaluation
    held_out = cfg.eval_fraction if cfg.eval_fraction is not None else cfg.eval_samples
    if held_out is None or held_out <= 0:
        return ds, None
    split = ds.train_test_split(test_size=held_out, shuffle=True, seed=seed)
    return split["train"], split["test"]


def longest_row(dataset, multiple: int | None = None) -> int | None:
    """The most tokens in a row of a dataset as the trainer tokenized it (its `input_ids`), rounded up to `multiple`
    (TRL's resolved `pad_to_multiple_of`, as its collator pads a batch), read off the Arrow column without building
    the rows in Python; None where that column is not there, or for a streamed dataset. A dataset selected from
    another reads the whole table underneath: never less than its own longest row."""
    import datasets
    import pyarrow.compute as pc

    if not isinstance(dataset, datasets.Dataset) or "input_ids" not in dataset.column_names or len(dataset) == 0:
        return None
    longest = pc.max(pc.list_value_length(dataset.data.column("input_ids"))).as_py()
    return math.ceil(longest / multiple) * multiple if multiple else longest


def load_train_dataset(cfg: DatasetConfig, vocab_size: int, seed: int, raw=None):
    """The training split alone (see load_datasets)."""
    return load_datasets(cfg, vocab_size, seed, raw)[0]
