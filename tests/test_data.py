"""Real fine-tuning data: TRL's three formats, loss on the answers only (computed here by hand), packing without
attention across examples, real vs padding tokens, synthetic lengths like instruction data, and every bad dataset
failing before weights load with one line."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import launch, metrics, summary
from qfsdp.config import compose_config
from qfsdp.data import SAMPLE_PATH, load_train_dataset
from qfsdp.validate import ConfigError, Machine, validate

CPU = Machine(gpus=0)


def _qa(n: int) -> list[tuple[str, str]]:
    """The first `n` questions and answers of the bundled sample."""
    out = []
    for line in SAMPLE_PATH.read_text().splitlines()[:n]:
        human, bot = json.loads(line)["text"].split("\n<bot>:", 1)
        out.append((human.removeprefix("<human>:").strip(), bot.strip()))
    return out


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _error(*overrides) -> str:
    with pytest.raises(ConfigError) as e:
        validate(compose_config(overrides), CPU)
    assert "\n" not in str(e.value)
    return str(e.value)


# -- the loss trained on, by hand -------------------------------------------------------------------------------------


def _tiny_4bit_fp32():
    """The tiny model as a run with precision=fp32 computes it (NF4 weights, float32 compute), LoRA not yet trained
    (B = 0): what the first step's loss is computed with."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qfsdp.tiny import tiny_model_path

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    path = tiny_model_path("tiny")
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.float32,
                                                 device_map={"": "cpu"}, attn_implementation="sdpa")
    # train mode (no dropout in it): in eval mode bitsandbytes repacks 4-bit weights for a CPU inference kernel on
    # AVX512-BF16 CPUs, which rounds differently from the training path
    return model.train(), AutoTokenizer.from_pretrained(path)


def _sum_loss(model, ids: list[int], targets: list[bool]) -> tuple[float, int]:
    """Sum of next-token cross entropy over the positions marked in `targets`, the example run alone."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()
    losses = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
    mask = torch.tensor(targets[1:])
    return losses[mask].sum().item(), int(mask.sum())


def _completion_tokens(tok, prompt: str, completion: str) -> tuple[list[int], list[bool]]:
    """Prompt + completion + EOS (TRL appends it to the completion), and which tokens are the completion's."""
    p = tok(prompt)["input_ids"]
    ids = tok(prompt + completion + tok.eos_token)["input_ids"]
    assert ids[:len(p)] == p  # the prompt tokenizes the same alone: its end is a token boundary
    return ids, [False] * len(p) + [True] * (len(ids) - len(p))


def _assistant_tokens(tok, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """The conversation rendered by the chat template, and which tokens are the assistant's replies with their
    end-of-turn token (the tiny template writes a reply as "<bot>: REPLY</s>"): found from the rendering of each
    reply's context, not from the template's markers."""
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    targets = [False] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        context = tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        start = len(tok(context)["input_ids"])
        with_reply = tok(context + " " + m["content"] + tok.eos_token)["input_ids"]
        assert ids[:len(with_reply)] == with_reply
        targets[start:len(with_reply)] = [True] * (len(with_reply) - start)
    return ids, targets


@pytest.mark.parametrize("kind,batching", [("prompt_completion", "padded"), ("prompt_completion", "packed"),
                                           ("chat", "padding_free")])
def test_first_step_loss_is_the_answers_loss_by_hand(tmp_path, kind, batching):
    """Eight examples, one optimizer step holding them all: the trainer's first loss is the mean cross entropy over
    the completion (or assistant) tokens alone, each example run on its own. Packed (examples share rows) and
    padding-free (a micro batch is one row), the same loss shows that no token attended across an example
    boundary."""
    qa = _qa(8)
    if kind == "chat":
        rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in qa]
        rows[0]["messages"] += [{"role": "user", "content": "And briefly?"}, {"role": "assistant", "content": "Yes."}]
        rows[1]["messages"].insert(0, {"role": "system", "content": "Answer well."})
        extra = ["trainer.assistant_only_loss=true"]
    else:
        rows = [{"prompt": f"<human>: {q}\n<bot>:", "completion": f" {a}"} for q, a in qa]
        extra = []
    data = _write(tmp_path / "data.jsonl", rows)
    run = tmp_path / "run"
    extra += {"padded": [], "packed": ["trainer.packing=true"],
              "padding_free": ["trainer.padding_free=true", "trainer.max_length=null"]}[batching]
    launch("dataset=local", f"dataset.path={data}", "precision=fp32", "world_size=1", "trainer.max_steps=1",
           "trainer.global_batch_size=8", "trainer.per_device_train_batch_size=2", *extra, f"hydra.run.dir={run}")

    model, tok = _tiny_4bit_fp32()
    total, count, real = 0.0, 0, 0
    for row in rows:
        ids, targets = (_assistant_tokens(tok, row["messages"]) if kind == "chat"
                        else _completion_tokens(tok, row["prompt"], row["completion"]))
        assert any(targets) and not all(targets)
        loss, n = _sum_loss(model, ids, targets)
        total, count, real = total + loss, count + n, real + len(ids)
    [first] = metrics(run)
    assert abs(first["loss"] - total / count) <= 1e-6, (first["loss"], total / count)
    # every real token was counted, padding apart (packed rows: none)
    assert first["tokens"] == real
    assert (first["padding_tokens"] > 0) if batching == "padded" else (first["padding_tokens"] == 0)
    s = summary(run)
    assert s["tokens"] == real and s["padding_tokens"] == first["padding_tokens"]


# -- packing ----------------------------------------------------------------------------------------------------------


def test_packed_row_losses_equal_each_example_alone():
    """TRL's best-fit packing and padding-free collator, the tiny model with sdpa: every example's per-token losses in
    the packed row equal its losses run alone (position_ids restart at each example; transformers masks attention
    block-diagonally). The same row without position_ids (one long causal sequence) differs: the check can fail."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from qfsdp.tiny import tiny_model_path

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path("tiny"), dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(0)
    examples = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (37, 5, 60, 23, 41, 12, 50, 9)]
    packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": examples, "labels": examples}), 128, "bfd")
    assert len(packed) == 2  # eight examples in two rows
    batch = DataCollatorForLanguageModeling(pad_token_id=3, padding_free=True)(list(packed))
    ids, positions = batch["input_ids"], batch["position_ids"]

    def token_losses(input_ids, **kwargs):
        with torch.no_grad():
            logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits[0]
        return torch.nn.functional.cross_entropy(logits[:-1], input_ids[0, 1:], reduction="none")

    packed_losses = token_losses(ids, position_ids=positions)
    unmasked = token_losses(ids)
    starts = [*(positions[0] == 0).nonzero().flatten().tolist(), ids.shape[1]]
    assert len(starts) - 1 == len(examples)
    worst = crossing = 0.0
    for a, b in zip(starts, starts[1:]):
        alone = token_losses(ids[:, a:b])
        worst = max(worst, (packed_losses[a:b - 1] - alone).abs().max().item())
        crossing = max(crossing, (unmasked[a:b - 1] - alone).abs().max().item())
    assert worst <= 1e-5
    assert crossing > 1e-2


@pytest.mark.slow
def test_packed_chat_one_vs_two_processes(tmp_path):
    """The conversational sample, assistant turns only, packed (padding-free rows, no attention mask): FSDP2 at 1 and
    2 processes train the same within 1e-5, and no batch carries padding. Eight conversations held out are evaluated
    after steps 2 and 3 (trainer.eval_strategy), the same at both within 1e-5; eval_loss reaches metrics.jsonl,
    summary.json, the progress bar, the log file and a sweep report."""
    from qfsdp.report import write_report

    runs, consoles = {}, {}
    for ws in (1, 2):
        runs[ws] = tmp_path / f"ws{ws}"
        consoles[ws] = launch(
            "dataset=sample_chat", "trainer.assistant_only_loss=true", "trainer.packing=true",
            "trainer.max_length=128", "precision=fp32", f"world_size={ws}", "trainer.max_steps=3",
            "dataset.eval_samples=8", "trainer.eval_strategy=steps", "trainer.eval_steps=2",
            "trainer.eval_packing=false", "trainer.per_device_eval_batch_size=2", f"hydra.run.dir={runs[ws]}")
    one, two = metrics(runs[1]), metrics(runs[2])
    assert len(one) == len(two) == 3
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two)) <= 1e-5
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    assert all(r["padding_tokens"] == 0 for r in one + two)
    evals = [[json.loads(line) for line in (runs[ws] / "eval.jsonl").read_text().splitlines()] for ws in (1, 2)]
    # every eval_steps steps, and at the last step (transformers)
    assert [e["step"] for e in evals[0]] == [e["step"] for e in evals[1]] == [2, 3]
    assert max(abs(a["eval_loss"] - b["eval_loss"]) for a, b in zip(*evals)) <= 1e-5
    for ws, rows, (e2, e3) in ((1, one, evals[0]), (2, two, evals[1])):
        # each evaluated step's own metrics row carries it
        assert [r.get("eval_loss") for r in rows] == [None, e2["eval_loss"], e3["eval_loss"]]
        assert summary(runs[ws])["eval_loss"] == e3["eval_loss"]
        assert (runs[ws] / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # the bar's postfix shows the last evaluation; the log file has each, and step 3's line the one before it
        bars = [line for line in consoles[ws].stderr.splitlines() if "%|" in line]
        assert f"eval_loss={e3['eval_loss']:.4f}" in bars[-1] and "3/3" in bars[-1]
        log = (runs[ws] / "launch.log").read_text()
        assert f"step 2/3: eval_loss={e2['eval_loss']:.4f}\n" in log
        assert f"step 3/3: loss={rows[2]['loss']:.4f}, " in log and f", eval_loss={e2['eval_loss']:.4f}\n" in log
        assert f"step 3/3: eval_loss={e3['eval_loss']:.4f}\n" in log
    # the sweep report's table: the eval loss column, from summary.json
    _, report_rows = write_report([runs[1], runs[2]], tmp_path / "report")
    assert [r["eval_loss"] for r in report_rows] == [evals[0][-1]["eval_loss"], evals[1][-1]["eval_loss"]]
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "| final loss | eval loss |" in md and f"| {evals[1][-1]['eval_loss']:.4f} |" in md
    assert "eval_loss" in (tmp_path / "report" / "summary.csv").read_text().splitlines()[0]


# -- formats and sources ----------------------------------------------------------------------------------------------


def _loaded(*overrides):
    cfg = compose_config(overrides)
    validate(cfg, CPU)
    return load_train_dataset(cfg.dataset, 512, cfg.seed)


def test_formats_found_from_fields(tmp_path):
    qa = _qa(4)
    chat = _write(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": q},
                                                          {"role": "assistant", "content": a}], "id": i}
                                            for i, (q, a) in enumerate(qa)])
    pc = _write(tmp_path / "pc.jsonl", [{"prompt": q, "completion": a, "source": "x"} for q, a in qa])
    sharegpt = _write(tmp_path / "sharegpt.jsonl", [{"conversations": [{"from": "user", "value": q},
                                                                        {"from": "assistant", "value": a}]}
                                                    for q, a in qa])
    assert _loaded("dataset=local", f"dataset.path={chat}").column_names == ["messages"]
    assert _loaded("dataset=local", f"dataset.path={pc}").column_names == ["prompt", "completion"]
    converted = _loaded("dataset=local", f"dataset.path={sharegpt}")
    assert converted.column_names == ["messages"] and converted[0]["messages"][1]["role"] == "assistant"
    assert _loaded("dataset=sample_chat").column_names == ["messages"]
    assert _loaded().column_names == ["text"]


def test_sources_parquet_saved_directory_and_forced_format(tmp_path):
    import datasets

    qa = _qa(4)
    ds = datasets.Dataset.from_list([{"prompt": q, "completion": a, "text": q + " " + a} for q, a in qa])
    ds.to_parquet(str(tmp_path / "pc.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    # rows with both a text and prompt/completion: TRL's order picks prompt-completion; dataset.format picks text
    assert _loaded("dataset=local", f"dataset.path={tmp_path / 'pc.parquet'}").column_names == ["prompt",
                                                                                                 "completion"]
    assert _loaded("dataset=local", f"dataset.path={tmp_path / 'saved'}", "dataset.format=text").column_names == [
        "text"]


def test_chat_sample_and_tiny_template():
    """The bundled conversations render with the tiny tokenizer's template, whose generation markers give TRL the
    assistant's replies and their end-of-turn token."""
    from transformers import AutoTokenizer

    from qfsdp.data import SAMPLE_CHAT_PATH
    from qfsdp.tiny import tiny_tokenizer_path

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path())
    conv = json.loads(SAMPLE_CHAT_PATH.read_text().splitlines()[0])["messages"]
    out = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    learned = tok.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert learned == " " + conv[-1]["content"] + "</s>"


# -- evaluation sets ---------------------------------------------------------------------------------------------------


def _eval_sets(*overrides):
    from qfsdp.data import load_datasets

    cfg = compose_config(["trainer.eval_strategy=steps", *overrides])
    validate(cfg, CPU)
    return load_datasets(cfg.dataset, 512, cfg.seed)


def test_eval_fraction_holds_out_a_share_with_the_seed():
    train, evaluation = _eval_sets("dataset.eval_fraction=0.25")
    assert (len(train), len(evaluation)) == (180, 60)  # of the sample's 240
    assert set(train["text"]).isdisjoint(evaluation["text"])
    # the same draw again (each rank makes its own): the same split
    again_train, again_eval = _eval_sets("dataset.eval_fraction=0.25")
    assert again_train["text"] == train["text"] and again_eval["text"] == evaluation["text"]
    assert _eval_sets("dataset.eval_fraction=0.25", "seed=7")[1]["text"] != evaluation["text"]
    # after max_samples: a share of the examples kept
    assert [len(d) for d in _eval_sets("dataset.eval_fraction=0.25", "dataset.max_samples=40")] == [30, 10]


def test_eval_split_of_a_directory(tmp_path):
    import datasets

    qa = _qa(12)
    rows = [{"prompt": q, "completion": a} for q, a in qa]
    files = tmp_path / "files"
    files.mkdir()
    _write(files / "train.jsonl", rows[:8])
    _write(files / "validation.jsonl", rows[8:])
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:8]),
                          "test": datasets.Dataset.from_list(rows[8:])}).save_to_disk(str(tmp_path / "saved"))
    train, evaluation = _eval_sets("dataset=local", f"dataset.path={files}", "dataset.eval_split=validation")
    assert train["prompt"] == [r["prompt"] for r in rows[:8]]
    assert evaluation["prompt"] == [r["prompt"] for r in rows[8:]]
    assert evaluation.column_names == ["prompt", "completion"]
    # a split expression of datasets
    _, first = _eval_sets("dataset=local", f"dataset.path={files}", "dataset.eval_split='validation[:2]'")
    assert first["prompt"] == [r["prompt"] for r in rows[8:10]]
    # a DatasetDict saved with datasets: by name
    _, saved = _eval_sets("dataset=local", f"dataset.path={tmp_path / 'saved'}", "dataset.eval_split=test")
    assert saved["prompt"] == [r["prompt"] for r in rows[8:]]
    msg = _error("dataset=local", f"dataset.path={tmp_path / 'saved'}", "dataset.eval_split=validation")
    assert "dataset.eval_split=validation is not a split of" in msg and "its splits are train, test" in msg
    msg = _error("dataset=local", f"dataset.path={files}", "dataset.eval_split=dev")
    assert msg.startswith("dataset.eval_split=dev: ") and "validation" in msg
    # a split of another format than the training split's
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:8]),
                          "validation": datasets.Dataset.from_list([{"text": "a b c"}])}).save_to_disk(
        str(tmp_path / "mixed"))
    msg = _error("dataset=local", f"dataset.path={tmp_path / 'mixed'}", "dataset.eval_split=validation")
    assert "split 'validation' is language modeling" in msg and "training split is prompt-completion" in msg


@pytest.mark.parametrize("overrides,expected", [
    (["dataset.eval_samples=8", "dataset.eval_fraction=0.1"],
     "dataset.eval_samples and dataset.eval_fraction are both set; choose one evaluation set"),
    (["dataset.eval_fraction=0.1", "dataset.eval_split=validation"],
     "dataset.eval_fraction and dataset.eval_split are both set"),
    (["dataset.eval_fraction=1.0"], "dataset.eval_fraction=1.0 must be between 0 and 1"),
    (["dataset.eval_fraction=0.5", "dataset.max_samples=1"], "leave at least one of the 1 examples"),
    (["dataset.eval_split=validation"], "dataset 'sample' is one file, without splits; hold out examples with "
                                        "dataset.eval_fraction=F"),
    (["dataset=synthetic", "dataset.eval_split=test"], "dataset=synthetic has no splits"),
    (["trainer.eval_strategy=steps"], "dataset.eval_fraction=F, or name a split with dataset.eval_split=NAME"),
])
def test_eval_set_settings(overrides, expected):
    assert expected in _error(*overrides)


def test_loss_plot_has_the_eval_curve(tmp_path, monkeypatch):
    """loss.png: the training loss per step, and the eval loss at the steps evaluated (step 0: eval_on_start),
    each with its legend entry."""
    from qfsdp import artifacts, plots

    drawn = {}
    monkeypatch.setattr(plots, "line_plot", lambda path, series, **kw: drawn.update(series=series, **kw))
    rows = [{"step": s, "loss": 3.0 - s / 10} for s in (1, 2, 3, 4)]
    rows[1]["eval_loss"], rows[3]["eval_loss"] = 2.9, 2.7
    artifacts.plot_loss(tmp_path, rows, [{"step": 0, "eval_loss": 3.1}, {"step": 2, "eval_loss": 2.9}])
    assert drawn["series"] == [("train loss", [1, 2, 3, 4], [2.9, 2.8, 2.7, 2.6]),
                               ("eval loss", [0, 2, 4], [3.1, 2.9, 2.7])]
    artifacts.plot_loss(tmp_path, [{"step": 1, "loss": 2.0}])
    assert [label for label, _, _ in drawn["series"]] == ["train loss"] and drawn["ylabel"] == "training loss"
    monkeypatch.undo()
    artifacts.plot_loss(tmp_path, rows)  # a real file too
    assert (tmp_path / "loss.png").stat().st_size > 0


# -- bad data and settings, before any weights load --------------------------------------------------------------------

QA = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]


@pytest.mark.parametrize("rows,expected", [
    ([{"text": "a b c"}, {"messages": QA}], "mixes formats: line 1 is language modeling ('text'), line 2 is "
                                            "conversational ('messages')"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": [QA[0]], "completion": [QA[1]]}], "line 2 is conversational "
                                                                                     "prompt-completion"),
    ([{"messages": QA}, {"messages": [QA[0]]}], "line 2: its messages have no assistant turn (roles: user)"),
    ([{"messages": [{"role": "tool", "content": "42"}, *QA]}], "cannot render"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "  "}], "line 2: the completion is empty"),
    ([{"prompt": "a", "completion": []}], "line 1: the completion is empty"),
    ([{"messages": [{"role": "user"}, QA[1]]}], "messages[0] is not a {role, content} object"),
])
def test_bad_rows(tmp_path, rows, expected):
    path = _write(tmp_path / "bad.jsonl", rows)
    msg = _error("dataset=local", f"dataset.path={path}")
    assert expected in msg and path in msg


def test_rows_loaded_by_datasets_are_checked_too():
    """Hub data is first seen by the workers, as a `datasets.Dataset` whose rows carry every column (null where a row
    has none): the same checks apply there."""
    import datasets
    from transformers import AutoTokenizer

    from qfsdp.data import DatasetError, check_loaded
    from qfsdp.tiny import tiny_tokenizer_path

    cfg = compose_config(["dataset=hub", "dataset.path=org/chat"])
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path())
    check_loaded(datasets.Dataset.from_list([{"messages": QA, "id": 1}, {"messages": QA, "id": 2}]), cfg, tok)
    with pytest.raises(DatasetError) as e:
        check_loaded(datasets.Dataset.from_dict({"messages": [QA, None], "text": [None, "plain"]}), cfg, tok)
    assert "dataset 'org/chat' mixes formats: row 1 is conversational ('messages'), row 2 is language" in str(e.value)


def test_template_that_drops_a_role(tmp_path):
    template = tmp_path / "user_assistant.jinja"
    template.write_text("{% for m in messages %}{% if m['role'] in ['user', 'assistant'] %}{{ m['content'] }}\n"
                        "{% endif %}{% endfor %}")
    path = _write(tmp_path / "chat.jsonl", [{"messages": [{"role": "system", "content": "Be brief."}, *QA]}])
    msg = _error("dataset=local", f"dataset.path={path}", f"trainer.chat_template_path={template}")
    assert "does not render role 'system'" in msg


def test_conversations_need_a_chat_template(tmp_path):
    from transformers import AutoTokenizer

    from qfsdp.tiny import tiny_tokenizer_path

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path())
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "chat_template.jinja").unlink(missing_ok=True)
    msg = _error("dataset=sample_chat", f"model.tokenizer={tmp_path / 'tok'}")
    assert "has no chat template" in msg and "model.tokenizer=" in msg and "trainer.chat_template_path=" in msg
    # the same data with a template file passes
    template = tmp_path / "t.jinja"
    from qfsdp.tiny import TINY_CHAT_TEMPLATE

    template.write_text(TINY_CHAT_TEMPLATE)
    validate(compose_config(["dataset=sample_chat", f"model.tokenizer={tmp_path / 'tok'}",
                             f"trainer.chat_template_path={template}"]), CPU)


@pytest.mark.parametrize("overrides,expected", [
    (["trainer.assistant_only_loss=true"], "needs conversational data"),
    (["dataset=sample_chat", "trainer.completion_only_loss=true"], "needs prompt-completion data"),
    (["trainer.padding_free=true"], "trainer.max_length=null"),
    (["trainer.packing=true", "trainer.max_length=null"], "needs trainer.max_length"),
    (["trainer.eval_strategy=steps"], "dataset.eval_samples=N"),
    (["dataset.eval_samples=240"], "dataset.eval_samples=240 must be between 0 and the number of examples (240)"),
    (["dataset=synthetic", "trainer.assistant_only_loss=true"], "synthetic token ids"),
])
def test_settings_the_data_cannot_honour(overrides, expected):
    assert expected in _error(*overrides)


def test_padding_free_without_packing_runs_with_max_length_null():
    validate(compose_config(["trainer.padding_free=true", "trainer.max_length=null"]), CPU)


# -- synthetic lengths -------------------------------------------------------------------------------------------------


def test_synthetic_lognormal_lengths():
    ds = _loaded("dataset=synthetic", "dataset.lengths=lognormal", "dataset.num_samples=2000",
                 "dataset.seq_length=1024", "dataset.median_length=200")
    lengths = torch.tensor([len(r) for r in ds["input_ids"]], dtype=torch.float)
    assert 180 <= lengths.median().item() <= 220
    assert lengths.min().item() >= 2 and lengths.max().item() == 1024  # the tail is cut at seq_length
    assert 0.01 <= (lengths == 1024).float().mean().item() <= 0.1
    fixed = _loaded("dataset=synthetic", "dataset.num_samples=4", "dataset.seq_length=64")
    assert {len(r) for r in fixed["input_ids"]} == {64}


def test_synthetic_lengths_knob_is_typed():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        compose_config(["dataset=synthetic", "dataset.lengths=normal"])
    assert "lengths" in str(e.value.__cause__ or e.value) and "lognormal" in str(e.value.__cause__ or e.value)


def test_longest_row_reads_the_tokenized_column():
    from datasets import Dataset

    from qfsdp.data import longest_row

    rows = Dataset.from_dict({"input_ids": [[1, 2, 3], [1] * 10, [4]]})
    assert longest_row(rows) == 10
    assert longest_row(rows, multiple=8) == 16  # as TRL's collator pads with pad_to_multiple_of
    assert longest_row(rows.select([0, 2])) >= 3  # a selection reads the table underneath: never less
    assert longest_row(Dataset.from_dict({"text": ["not tokenized"]})) is None
    assert longest_row(Dataset.from_dict({"input_ids": []})) is None
    assert longest_row(rows.to_iterable_dataset()) is None  # streamed: not known before training
