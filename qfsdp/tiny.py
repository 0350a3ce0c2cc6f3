"""Tiny random-weight models and a tokenizer, built locally without any download and cached on disk.

They go through the same `from_pretrained` path as real checkpoints (4-bit quantization included), so the demo and
the tests exercise the real loading code on any machine.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from qfsdp.data import SAMPLE_PATH

# Bump when the recipe below changes, so stale caches are rebuilt.
_VERSION = 5
_VOCAB = 512

# Turns written like the bundled sample's text ("<human>: ...\n<bot>: ..."), so the tokenizer (trained on that text) and
# the tiny model stay as they were. The assistant's reply and its end-of-turn token (</s>) sit inside {% generation %}
# markers, so TRL's `assistant_only_loss` can mask everything else and the model learns to stop; unknown roles fail
# loudly rather than vanish from the rendered text.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- '<system>: ' + message['content'] + '\\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '<human>: ' + message['content'] + '\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<bot>:' -}}{%- generation -%}{{- ' ' + message['content'] + '</s>' -}}{%- endgeneration -%}{{- '\\n' -}}"
    "{%- else -%}"
    "{{- raise_exception('the tiny chat template knows system, user and assistant, not ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<bot>:' -}}{%- endif -%}"
)

TINY_ARCHITECTURES = {
    "tiny": dict(
        model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
    ),
    # The demo's model at hidden 64 with its head at init scale: small logits, on which the 1e-5 bounds between
    # world sizes were measured (tests/test_parity.py); the demo's 5x head puts bf16 rounding there at ~5e-5.
    "tiny_h64": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
    ),
    # Four layers: room for FSDP2 units of several layers that are resharded and gathered again (tests).
    "tiny_4layers": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
    ),
    "tiny_qwen2": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
    ),
    # OPT-1.3B's layout at the tiny size: learned positional embeddings, head tied to the input embedding, LayerNorm
    # before attention and MLP, biases everywhere, dropout 0.1 as OPT ships it (conf/model/tiny_opt.yaml turns it off
    # with model.dropout=0, so runs at 1 and N processes compare).
    "tiny_opt": dict(
        model_type="opt", hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=2048, do_layer_norm_before=True, dropout=0.1,
        tie_word_embeddings=True,
    ),
}

# The frozen head at its init scale (std 0.02) bounds the logit gap LoRA can open to ~1.3 nats through the final
# norm, so the demo's loss could hardly fall below 0.8 of ln(vocab); a 5x larger head lets LoRA visibly learn.
HEAD_SCALE = {"tiny": 5.0}


def cache_dir() -> Path:
    return Path(os.environ.get("QFSDP_CACHE", Path.home() / ".cache" / "qfsdp"))


def tiny_tokenizer_path() -> Path:
    path = cache_dir() / f"tokenizer-v{_VERSION}"
    if not (path / "tokenizer.json").exists():
        build_once(path, _build_tokenizer)
    return path


def tiny_model_path(name: str) -> Path:
    """Directory of the cached tiny model `name` (one of TINY_ARCHITECTURES), built on first use."""
    path = cache_dir() / f"{name}-v{_VERSION}"
    if not (path / "config.json").exists():
        build_once(path, lambda out: _build_model(name, out))
    return path


def build_once(path: Path, build) -> None:
    # Several processes may ask at once (every torchrun rank): local rank 0 builds aside and renames it into place,
    # the other ranks of the node wait for it (a random 8B checkpoint is 16 GB: build it once). Several local rank
    # 0s share one cache when torchrun agents (nodes) share a machine or a network file system: a file lock lets one
    # build while the others wait and then find it built; the rename alone keeps the result whole if the lock does
    # not hold (a file system without locks).
    import fcntl
    import time

    import torch.distributed as dist

    if int(os.environ.get("LOCAL_RANK", "0")) > 0:
        deadline = time.monotonic() + 3600
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited an hour for local rank 0 to build {path}")
            time.sleep(1)
        return
    if dist.is_available() and dist.is_initialized():
        # transformers' save_pretrained writes nothing on ranks other than 0 once a process group exists.
        raise RuntimeError(f"{path} is not built yet: call qfsdp.model.prepare_checkpoint before init_process_group")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:
            pass  # no locking here: builders may duplicate work, the rename below still keeps one whole copy
        if path.exists():
            return  # another builder finished while this one waited for the lock
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
        try:
            build(tmp)
            try:
                tmp.rename(path)
            except OSError:
                if not path.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in SAMPLE_PATH.read_text().splitlines() if line.strip()]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=2048,
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.save_pretrained(out)


def tiny_config(name: str):
    """The `PretrainedConfig` of the tiny model `name`, sized to the tiny tokenizer (no weights built)."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_path())
    spec = dict(TINY_ARCHITECTURES[name])
    return AutoConfig.for_model(
        spec.pop("model_type"), vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **spec,
    )


def _build_model(name: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = tiny_config(name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if name in HEAD_SCALE:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(HEAD_SCALE[name])
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_tokenizer_path()).save_pretrained(out)
