"""fsdp2.checkpointed_layers=auto (qfsdp/activations.py): one layer's activations measured on a one-layer copy of the
model, and the arithmetic that turns them into a count of layers, checked against peaks measured on GPUs."""

import pytest
import torch

from qfsdp.activations import GIB, checkpointed_count, plan_checkpointing, resolve_checkpointed_layers, \
    row_length, saved_bytes_per_token
from qfsdp.config import ModelConfig, compose_config
from qfsdp.model import load_config

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _probe_each_shape_once():
    """The plans below probe full-size 8B and 70B layers on CPU (8-20 s each): each shape is measured once for the
    module and its count reused, as the plan would get it again. Tests of the probe itself call it directly."""
    from qfsdp import activations

    probe, seen = activations.saved_bytes_per_token, {}

    def once(config, dtype, device, attn_implementation="sdpa", tokens=activations.PROBE_TOKENS, autocast=False,
             **compile_as):
        key = (config.to_json_string(), dtype, str(device), attn_implementation, tokens, autocast,
               *sorted(compile_as.items()))
        if key not in seen:
            seen[key] = probe(config, dtype, device, attn_implementation, tokens, autocast, **compile_as)
        return seen[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(activations, "saved_bytes_per_token", once)
        yield


def _graph_saved_bytes(out: torch.Tensor, stop: torch.Tensor, weights: set[int]) -> int:
    """What autograd's graph from `out` back to `stop` holds for backward, read from the nodes' `_saved_*`
    attributes, or a compiled graph's `saved_tensors` (not through saved-tensor hooks, as the probe does), each
    storage once, weights excluded."""
    seen, storages, todo = set(), {}, [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            value = getattr(node, name) if name.startswith("_saved_") or name == "saved_tensors" else None
            for t in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in weights:
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        todo += [nxt for nxt, _ in node.next_functions if nxt is not None and getattr(nxt, "variable", None) is not stop]
    return sum(storages.values())


@pytest.mark.parametrize("compiled", [False, True])
def test_the_probe_counts_what_the_layers_graph_holds(compiled):
    from transformers import AutoModelForCausalLM

    from qfsdp.model import decoder_layers
    from qfsdp.shard import compile_layer

    config = load_config(ModelConfig(path="tiny", random_init=True))
    config.num_hidden_layers = 1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(torch.bfloat16)
    layer = decoder_layers(model)[0]
    if compiled:  # as a layer that keeps its activations runs with compile=true
        compile_layer(layer, checkpointed=False)
    outputs = []
    layer.register_forward_hook(
        torch.compiler.disable(lambda m, args, out: outputs.append(out[0] if isinstance(out, tuple) else out)))
    x = torch.randn(1, 48, config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    model.get_decoder()(inputs_embeds=x, use_cache=False)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held = _graph_saved_bytes(outputs[0], x, weights)
    assert held > 10 * 48 * config.hidden_size * 2  # activations of a dozen hidden-sized tensors at least
    assert saved_bytes_per_token(config, torch.bfloat16, CPU, tokens=48, compiled=compiled) == held / 48
    torch.compiler.reset()


def test_the_probe_is_per_token_and_leaves_the_weights_out():
    config = load_config(ModelConfig(path="x", random_init=True, architecture="llama3_1_8b"))
    a, b = (saved_bytes_per_token(config, torch.bfloat16, CPU, tokens=t) for t in (16, 64))
    assert a == b
    # One layer's weights are 218M bf16 values: counted once, even at 64 tokens they would be 6.8 MB a token.
    assert 20 * 4096 * 2 < a < 40 * 4096 * 2
    # 8B at micro batch 4 x 2048 tokens on GPUs: 1.42 GiB a layer eager (4 x H200, 2026-11-21: qfsdp-1-noac 29.00
    # against qfsdp-1 8.03 GiB at micro batch 2, 31 layers' activations less 32 layer inputs), 0.88 compiled
    # (1 x H100, 2026-12-07). The probe (eager, here CPU attention) must not count less, nor much more.
    assert 1.42 <= a * 8192 / GIB <= 1.25 * 1.42


def _preset(*extra):
    from qfsdp.bench.matrix import PRESETS

    return compose_config([*PRESETS["llama8b"], "fsdp2.checkpointed_layers=auto", *extra])


H100 = 79.1 * GIB  # total_memory of an H100 80GB HBM3


def test_8b_on_an_h100_keeps_every_layer_and_predicts_the_measured_peaks():
    plan = plan_checkpointing(_preset(), CPU, 1, H100)
    assert plan.layers == 32 and plan.checkpointed == 0 and plan.peak <= plan.budget
    # Measured, micro batch 4: every layer recomputing 9.99 GiB (eager, 2 x H200, d7acd58) and 10.24 (compiled,
    # H100); none, eager, the stock recipe 51.41 (H100). The prediction must not be lower, nor far above.
    assert 9.99 <= plan.fixed / GIB <= 1.1 * 10.24
    assert 51.41 <= plan.peak / GIB <= 1.2 * 51.41


def test_a_24_gib_cap_keeps_as_many_layers_as_fit():
    plan = plan_checkpointing(_preset("gpu_memory_limit_gib=24"), CPU, 1, H100)
    assert 0 < plan.checkpointed < 32
    assert plan.peak <= plan.budget < plan.peak_with(plan.checkpointed - 1)  # one more layer would not fit
    assert plan.budget == pytest.approx(0.9 * 24 * GIB - GIB)
    # Two GPUs hold half the weights each: room for more layers' activations.
    assert plan_checkpointing(_preset("gpu_memory_limit_gib=24"), CPU, 2, H100).checkpointed < plan.checkpointed
    # A GPU that holds the weights and little else: every layer recomputes.
    assert plan_checkpointing(_preset("gpu_memory_limit_gib=11"), CPU, 1, H100).checkpointed == 32


def test_compiled_layers_are_counted_compiled_and_predict_the_measured_peaks():
    # 1 x H100, 2026-12-07, tree of abb61d8, compile=true, micro batch 4 (docs/BENCHMARKS.md, the frontier): train
    # peaks (allocated) of 16.68 GiB with 7 layers keeping their activations, 25.28 with 16, 41.74 with all 32.
    capped = _preset("gpu_memory_limit_gib=24")
    eager, compiled = (plan_checkpointing(capped, CPU, 1, H100, compiled=c) for c in (False, True))
    assert not eager.compiled and compiled.compiled and compiled.layer == eager.layer and compiled.fixed == eager.fixed
    assert compiled.kept < 0.8 * eager.kept  # compiled layers save less than eager ones
    assert compiled.checkpointed < eager.checkpointed  # so more of them keep their activations
    assert compiled.peak <= compiled.budget < compiled.peak_with(compiled.checkpointed - 1)
    for kept, measured in ((7, 16.68), (16, 25.28), (32, 41.74)):
        assert measured <= compiled.peak_with(32 - kept) / GIB <= 1.1 * measured
    assert "activations (1.07 GiB a layer, measured compiled, rows of up to 2048 tokens)" in compiled.describe()
    # Where the eager count keeps every layer already, no compiled count is taken: it would cost a compile.
    assert not plan_checkpointing(_preset(), CPU, 1, H100, compiled=True).compiled


def test_rows_are_planned_at_the_datas_longest_within_max_length():
    cfg = _preset("trainer.max_length=2048")
    assert [row_length(cfg, n) for n in (None, 300, 2048, 5000)] == [2048, 300, 2048, 2048]
    assert row_length(_preset("trainer.max_length=null"), 300) == 300
    assert row_length(_preset("trainer.max_length=null"), None) is None
    # The Kaggle recipe on one GPU (fp16, 15 GiB cap, micro batch 4) on its sample data, whose longest row is 260
    # tokens as TRL tokenizes it (test below): planned for 2048-token rows it kept one layer's activations (1 x H100,
    # abb61d8); for the rows it has, every layer's activations but one fit.
    kaggle = compose_config(["experiment=kaggle_2xt4", "model.random_init=true", "world_size=1",
                             "fsdp2.checkpointed_layers=auto"])
    short = plan_checkpointing(kaggle, CPU, 1, H100, longest=260)
    per_token = saved_bytes_per_token(load_config(kaggle.model), torch.float16, CPU, tokens=16, autocast=True)
    assert short.row == 260 and short.layer == pytest.approx(4 * 260 * per_token)  # sdpa: the same per token
    assert short.checkpointed == 1 and short.peak <= short.budget
    # Measured with every layer recomputing on that data: 6.67 GiB allocated (1 x H100, cc72490). The prediction
    # holds no margin here: the budget's slack does (90% of the cap, less 1 GiB).
    assert short.fixed / GIB == pytest.approx(6.67, rel=0.02)


@pytest.mark.parametrize("max_length", [2048, 64])
def test_auto_is_handed_the_longest_row_the_trainer_tokenized(max_length, tmp_path):
    # The sample's rows run to 260 tokens with the tiny tokenizer: TRL truncates them to max_length when shorter.
    import json

    from conftest import SCRIPTS, torchrun

    torchrun(1, str(SCRIPTS / "planned_row.py"), str(tmp_path), "dataset=sample", "trainer.max_steps=1",
             f"trainer.max_length={max_length}")
    seen = json.loads((tmp_path / "planned_row.json").read_text())
    assert seen["planned"] == seen["arrow"] == seen["python"]
    assert seen["python"] == 64 if max_length == 64 else 200 < seen["python"] < 2048


def test_70b_predictions_are_not_below_the_measured_peaks():
    # 1 x H100, 2026-12-07, micro batch 2, every layer recomputing: 12.69 GiB with fsdp2=offload under a 24 GiB cap,
    # 47.55 resident (docs/benchmarks/2026-12-07-h100/cc72490-70b-*.txt).
    base = ["model=llama3_1_70b", "model.random_init=true", "dataset=synthetic", "trainer.max_length=2048",
            "trainer.per_device_train_batch_size=2", "fsdp2.checkpointed_layers=auto"]
    offload = plan_checkpointing(compose_config([*base, "fsdp2=offload", "gpu_memory_limit_gib=24"]), CPU, 1, H100)
    assert 12.69 <= offload.fixed / GIB <= 1.3 * 12.69 and offload.peak <= offload.budget
    resident = plan_checkpointing(compose_config(base), CPU, 1, H100)
    assert 47.55 <= resident.fixed / GIB <= 1.1 * 47.55 and resident.checkpointed < 80


def test_the_count_arithmetic():
    assert checkpointed_count(32, fixed=10, layer=2, layer_input=1, budget=9) == 32
    assert checkpointed_count(32, fixed=10, layer=2, layer_input=1, budget=15.5) == 27
    assert checkpointed_count(32, fixed=10, layer=2, layer_input=1, budget=100) == 0


@pytest.mark.parametrize("value, expected", [("all", None), (None, None), (3, 3), ("auto", None)])
def test_what_reaches_the_model_on_cpu(value, expected):
    cfg = compose_config([f"fsdp2.checkpointed_layers={'null' if value is None else value}"])
    assert resolve_checkpointed_layers(cfg, CPU, 1) == (expected, None)  # auto: every layer on CPU
    off = compose_config(["fsdp2.activation_checkpointing=false"])
    assert resolve_checkpointed_layers(off, CPU, 1) == (None, None)


def test_every_rank_takes_the_plan_of_the_gpu_with_the_least_room(monkeypatch, tmp_path):
    from qfsdp import train
    from qfsdp.activations import CheckpointPlan
    from qfsdp.distributed import Dist

    plan = CheckpointPlan(layers=32, checkpointed=25, budget=20 * GIB, fixed=10 * GIB, layer=1.5 * GIB,
                          layer_input=0.06 * GIB, kept=1.0 * GIB, compiled=True, row=2048)
    monkeypatch.setattr(train, "resolve_checkpointed_layers", lambda cfg, device, world_size, longest: (25, plan))
    monkeypatch.setattr(train, "all_gather_object", lambda count: [count, 28, 27])  # a rank with less room: 28
    d = Dist(rank=0, world_size=3, local_rank=0, device=torch.device("cuda", 0))  # no GPU is touched
    assert train.checkpointed_layers(compose_config([]), d, tmp_path) == (28, plan)
    assert plan.peak_with(28) == 10 * GIB + 4 * 0.94 * GIB  # the summary's prediction at the count taken
    # A rank whose plan failed takes part in the gather all the same, as "all": every rank then recomputes all.
    monkeypatch.setattr(train, "all_gather_object", lambda count: [count, None, 27])
    assert train.checkpointed_layers(compose_config([]), d, tmp_path) == (None, plan)
    monkeypatch.setattr(train, "resolve_checkpointed_layers", lambda cfg, device, world_size, longest: (None, None))
    gathered = []
    monkeypatch.setattr(train, "all_gather_object", lambda count: gathered.append(count) or [count, 25])
    assert train.checkpointed_layers(compose_config([]), d, tmp_path) == (None, None) and gathered == [None]


def test_a_plan_that_cannot_be_made_leaves_every_layer_recomputing(caplog, monkeypatch):
    def no_gpu(device):
        raise RuntimeError("no such GPU")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_gpu)
    cfg = compose_config(["fsdp2.checkpointed_layers=auto"])
    with caplog.at_level("WARNING", logger="qfsdp.activations"):
        assert resolve_checkpointed_layers(cfg, torch.device("cuda", 0), 1) == (None, None)
    assert "every decoder layer recomputes, no plan could be made" in caplog.text


@pytest.mark.parametrize("compiled", [False, True])
def test_the_probe_leaves_nothing_allocated(compiled):
    # On a GPU the probe's layer stayed allocated into loading and training (0.45 GiB more at 8B, 1 x H100,
    # 2026-12-07): its saved tensors, handed back to autograd, formed reference cycles through the graph.
    import gc

    def held() -> int:
        # by storage: compile's fake tensors (its metadata, kept in its caches) say "cpu" but store nothing
        return sum(o.untyped_storage().nbytes() for o in gc.get_objects()
                   if isinstance(o, torch.Tensor) and o.untyped_storage().device.type == "cpu")

    config = load_config(ModelConfig(path="x", random_init=True, architecture="llama3_1_8b"))
    gc.collect()
    before = held()
    saved_bytes_per_token(config, torch.bfloat16, CPU, tokens=16, compiled=compiled)  # compiled code holds none either
    gc.collect()
    assert held() - before < 2**20  # one layer's weights are 436 MiB


@pytest.mark.parametrize("override, why", [("fsdp2=off", "fsdp2=off"), ("lora.lora_dropout=0.05", "lora_dropout=0.05"),
                                           ("trainer.max_length=null", "no tokenized rows"),
                                           ("trainer.activation_offloading=true", "activation_offloading=true")])
def test_runs_the_probe_does_not_describe_recompute_every_layer(override, why, caplog, monkeypatch):
    # LoRA's dropout masks and float32 layer inputs (fsdp2=off) keep ~1.5x what the probe's plain layer counts.
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: pytest.fail("no plan expected"))
    with caplog.at_level("INFO", logger="qfsdp.activations"):
        assert resolve_checkpointed_layers(compose_config([override]), torch.device("cuda", 0), 1) == (None, None)
    assert why in caplog.text


def test_attention_without_a_fused_kernel_is_probed_at_the_rows_length():
    # Eager attention keeps a row x row matrix per head: per token it grows with the row, so the plan probes one
    # row of the run's length (sdpa's fused kernels keep per-token state only).
    config = load_config(ModelConfig(path="tiny", random_init=True))
    eager = [saved_bytes_per_token(config, torch.bfloat16, CPU, "eager", tokens=t) for t in (16, 256)]
    sdpa = [saved_bytes_per_token(config, torch.bfloat16, CPU, "sdpa", tokens=t) for t in (16, 256)]
    assert eager[1] > 1.5 * eager[0] and sdpa[0] == sdpa[1]


def test_layers_without_a_per_layer_switch_are_not_planned(monkeypatch):
    # auto leaves layers out of checkpointing through transformers' per-layer flag: without it there is no plan
    # (and resolve_checkpointed_layers falls back to every layer recomputing).
    from qfsdp import activations

    monkeypatch.setattr(activations, "GradientCheckpointingLayer", type("Other", (), {}))
    config = load_config(ModelConfig(path="tiny", random_init=True))
    with pytest.raises(ValueError, match="no per-layer checkpointing switch"):
        saved_bytes_per_token(config, torch.bfloat16, CPU, tokens=16)
