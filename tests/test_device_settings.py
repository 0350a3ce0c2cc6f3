"""`deterministic=true` must make PyTorch strict, not warn-only: in warn-only mode PyTorch keeps non-deterministic
kernels (on GPUs, cuDNN's attention backward) and two runs of one config drift apart (docs/BENCHMARKS.md, fourth
run). Checked in a fresh process: the settings are global to it."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

PROBE = """
import json, torch, torch._inductor.config as inductor
from qfsdp.config import compose_config
from qfsdp.worker import apply_device_settings
applied = apply_device_settings(compose_config(OVERRIDES), torch.device("cpu"))
print(json.dumps({"applied": applied, "enabled": torch.are_deterministic_algorithms_enabled(),
                  "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
                  "emulate_casts": inductor.emulate_precision_casts,
                  "eager_division": inductor.eager_numerics.division_rounding,
                  "no_ftz": inductor.eager_numerics.disable_ftz}))
"""


def _settings(overrides: list[str]) -> dict:
    code = PROBE.replace("OVERRIDES", repr(overrides))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_deterministic_is_strict():
    assert _settings(["deterministic=true"]) == {"applied": ["division_rounding", "disable_ftz"], "enabled": True,
                                                 "warn_only": False, "emulate_casts": True, "eager_division": True,
                                                 "no_ftz": True}


def test_default_leaves_kernels_alone():
    assert _settings([]) == {"applied": [], "enabled": False, "warn_only": False, "emulate_casts": False,
                             "eager_division": False, "no_ftz": False}
