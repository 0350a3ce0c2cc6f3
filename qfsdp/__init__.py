"""qfsdp: QLoRA fine-tuning (bitsandbytes NF4 + PEFT LoRA) on PyTorch FSDP2, trained by TRL's SFTTrainer."""

import logging

# bitsandbytes looks for an optional CPU kernel package on import and warns on every rank when it is absent; the
# portable kernels it falls back to are the ones qfsdp uses on CPU anyway (see nf4.keep_portable_cpu_kernels).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
