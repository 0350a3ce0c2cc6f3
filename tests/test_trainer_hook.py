"""Pins the one private hook qfsdp relies on (qfsdp.train.hand_sharded_model_to_trainer): transformers' Trainer
path for models that arrive already sharded with FSDP2. If a transformers upgrade renames it, this fails first
(and the 2-process parity tests would then fail with DDP wrapping errors)."""

import inspect

from transformers import Trainer
from transformers.distributed.configuration_utils import DistributedConfig

from qfsdp.train import hand_sharded_model_to_trainer


def test_trainer_keys_its_presharded_path_on_the_model():
    source = inspect.getsource(Trainer)
    assert 'getattr(model, "is_distributed_loading_by_transformers", False)' in source
    assert "_defer_fsdp_gradient_reduction" in source
    assert DistributedConfig(fsdp_size=2, dp_replicate_size=1).dp_replicate_size == 1


def test_hook_marks_a_peft_model():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qfsdp.tiny import tiny_model_path

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path("tiny")),
                           LoraConfig(r=2, target_modules="all-linear"))
    assert not getattr(model, "is_distributed_loading_by_transformers", False)
    hand_sharded_model_to_trainer(model, world_size=2)
    assert model.is_distributed_loading_by_transformers  # what Trainer reads, through PEFT's forwarding
    assert model.config.distributed_config.fsdp_size == 2


def test_hook_describes_an_hsdp_mesh():
    """HSDP: Trainer defers only the cross-replica all-reduce during accumulation when dp_replicate_size > 1, so the
    sizes must be the mesh's (replicate, shard), not (1, world_size)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qfsdp.tiny import tiny_model_path

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path("tiny")),
                           LoraConfig(r=2, target_modules="all-linear"))
    hand_sharded_model_to_trainer(model, world_size=8, replicate=2)
    dc = model.config.distributed_config
    assert (dc.dp_replicate_size, dc.fsdp_size, dc.dp_size) == (2, 4, 8)
