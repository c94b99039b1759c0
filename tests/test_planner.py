"""The memory planner's estimate against peak memory measured on an H200 (shared/GPU.md), and its choices."""

import pytest

from forge.errors import ForgeError
from forge.planner import GIB, ModelShape, estimate, plan

QWEN2_7B = ModelShape(hidden=3584, intermediate=18944, layers=28, vocab=152064, heads=28, kv_heads=4)
TOKENS = 4 * 2048


@pytest.mark.parametrize("method,checkpointing,liger,measured_gib", [
    ("lora", True, False, 32.6),
    ("lora", True, True, 19.7),
    ("lora", False, True, 96.9),
    ("qlora", True, False, 29.5),
    ("qlora", True, True, 18.7),
])
def test_estimate_is_within_20_percent_of_measured_peaks(method, checkpointing, liger, measured_gib):
    got = estimate(QWEN2_7B, method, TOKENS, checkpointing, liger) / GIB
    assert abs(got - measured_gib) / measured_gib < 0.20, f"{got:.1f} GiB vs {measured_gib} measured"


def test_plan_keeps_the_effective_batch_and_prefers_no_checkpointing():
    roomy = plan(QWEN2_7B, "lora", 2048, per_device=4, accumulation=2, free_bytes=int(140 * GIB), liger=True)
    assert not roomy.gradient_checkpointing
    assert roomy.per_device_train_batch_size * roomy.gradient_accumulation_steps == 8
    tight = plan(QWEN2_7B, "lora", 2048, per_device=4, accumulation=2, free_bytes=int(40 * GIB), liger=False)
    assert tight.per_device_train_batch_size * tight.gradient_accumulation_steps == 8
    assert tight.estimate_bytes <= 0.9 * 40 * GIB and "GiB free" in tight.reason


def test_plan_refuses_what_cannot_fit_with_the_fix():
    with pytest.raises(ForgeError) as info:
        plan(QWEN2_7B, "lora", 2048, per_device=1, accumulation=1, free_bytes=int(8 * GIB), liger=False)
    assert info.value.code == "out_of_memory" and "qlora" in info.value.hint
