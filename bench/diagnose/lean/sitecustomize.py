"""Diagnosis only (bench/diagnose/h200x2_scaling.sh `lean` runs): with QFSDP_DIAG_LEAN=1 on PYTHONPATH, every Python
process drops the per-micro-step host syncs that TRL's SFTTrainer (entropy, token accuracy, token count: gathered
across ranks and read back with .item()) and transformers' Trainer (include_num_input_tokens_seen) add, to measure
what they cost. The loss is computed exactly as TRL's default path computes it. Not part of qfsdp."""
import os

if os.environ.get("QFSDP_DIAG_LEAN") == "1":
    import torch
    import transformers
    from trl.trainer import sft_trainer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = (-outputs.log_probs).sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return loss

    def track_tokens(self, inputs):  # every token counts (synthetic data has no padding)
        self.state.num_input_tokens_seen += inputs["input_ids"].numel() * self.args.world_size

    sft_trainer.SFTTrainer.compute_loss = compute_loss
    transformers.Trainer._track_num_input_tokens = track_tokens
