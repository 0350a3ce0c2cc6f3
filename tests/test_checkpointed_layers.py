"""fsdp2.checkpointed_layers: checkpointing on the first N decoder layers only (shard.enable_checkpointing). The
other layers keep their activations; the gradients stay exactly those of full checkpointing."""

import pytest
import torch


def _trained_model(checkpointing: bool, count: int | None, compile: bool = False):
    from qfsdp.config import FSDP2Config, LoraConfig, ModelConfig, QuantConfig
    from qfsdp.model import attach_lora, load_model, make_trainable_fp32
    from qfsdp.shard import parallelize

    model = load_model(ModelConfig(path="tiny_4layers", random_init=True), QuantConfig(enabled=False),
                       torch.float32, seed=5)
    model = attach_lora(model, LoraConfig(), seed=5)
    make_trainable_fp32(model)
    parallelize(model, None, torch.device("cpu"),
                FSDP2Config(activation_checkpointing=checkpointing, checkpointed_layers=count),
                param_dtype=torch.float32, compile=compile)
    return model.train()


def _saved_bytes_and_grads(model) -> tuple[int, dict]:
    ids = torch.randint(0, 500, (2, 64), generator=torch.Generator().manual_seed(0))
    saved = []
    # Innermost hooks win: a tensor saved inside a checkpoint goes to the checkpoint's hooks, not these.
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(saved), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_the_last_layers_keep_their_activations_and_the_gradients_stay_the_same():
    from qfsdp.shard import decoder_layers, is_checkpointed

    runs = {}
    for name, checkpointing, count in (("all", True, None), ("first 2", True, 2), ("none of 4", True, 0),
                                       ("off", False, None)):
        model = _trained_model(checkpointing, count)
        flags = [is_checkpointed(layer, checkpointing) for layer in decoder_layers(model)]
        runs[name] = (*_saved_bytes_and_grads(model), flags)
    assert runs["all"][2] == [True] * 4 and runs["first 2"][2] == [True, True, False, False]
    assert runs["none of 4"][2] == runs["off"][2] == [False] * 4
    # Each layer that keeps its activations saves the same bytes outside every checkpoint: two of four, half.
    # (With checkpointing off the embedding's output needs no gradient, so the first layer saves a little less.)
    full, half, none_, off = (runs[k][0] for k in ("all", "first 2", "none of 4", "off"))
    assert full < half < none_ and 0.95 * none_ < off <= none_
    assert half - full == (none_ - full) // 2
    # Recompute runs the same float32 operations on CPU: the gradients are bit-identical.
    for name in ("first 2", "none of 4", "off"):
        grads = runs[name][1]
        assert grads.keys() == runs["all"][1].keys()
        for key, grad in grads.items():
            assert torch.equal(grad, runs["all"][1][key]), (name, key)


def test_more_layers_than_the_model_has_are_refused():
    with pytest.raises(ValueError, match="checkpointed_layers=5 but the model has 4"):
        _trained_model(True, 5)


def test_layers_without_transformers_per_layer_switch_are_refused():
    """A decoder layer outside GradientCheckpointingLayer would ignore the flag: every layer would recompute."""
    from torch import nn

    from qfsdp.shard import enable_checkpointing

    model = _trained_model(False, None)
    plain = [nn.Linear(2, 2) for _ in range(4)]
    with pytest.raises(ValueError, match="has no per-layer checkpointing switch"):
        enable_checkpointing(model, plain, 2)


def test_compile_follows_each_layers_checkpointing(monkeypatch):
    """Checkpointed layers are compiled by parts inside their checkpoint, the others whole (shard.compile_layer)."""
    from qfsdp import shard

    seen = []
    monkeypatch.setattr(shard, "compile_layer", lambda layer, checkpointed, *a, **k: seen.append(checkpointed))
    _trained_model(True, 1, compile=True)
    assert seen == [True, False, False, False]
