"""The mixed-step attention (attention.py): registered with transformers only when asked."""
from __future__ import annotations

import subprocess
import sys


def test_importing_the_engine_registers_no_attention_until_a_model_is_prepared():
    code = ("from transformers import AttentionInterface; import deployments.llm.engine; "
            "from deployments.llm.attention import MIXED, register; "
            "before = MIXED in AttentionInterface._global_mapping; register(); "
            "print(before, MIXED in AttentionInterface._global_mapping)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "True"]
