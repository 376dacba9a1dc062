"""A tiny LlamaForCausalLM (config, random init) learns with each optimizer over 100 CPU steps."""

import math

import pytest

from galore_kernels.demo import optimizer_state_bytes, train


@pytest.mark.parametrize("optimizer", ["galore_adamw", "galore_adamw_8bit"])
def test_loss_falls(optimizer):
    losses, opt = train(optimizer, steps=100)
    assert all(math.isfinite(x) for x in losses)
    first, last = losses[0], sum(losses[-10:]) / 10
    assert first > 0.9 * math.log(128)  # starts near uniform over the vocabulary
    assert last < 0.6 * first, (first, last)
    assert optimizer_state_bytes(opt) > 0


def test_8bit_state_is_smaller():
    _, fp32 = train("galore_adamw", steps=2)
    _, int8 = train("galore_adamw_8bit", steps=2)
    assert optimizer_state_bytes(int8) < optimizer_state_bytes(fp32)
