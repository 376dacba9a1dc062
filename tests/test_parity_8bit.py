"""8-bit moments: GaLoreAdamW8bit against GaLoreAdamW, and its plain path against bitsandbytes' AdamW8bit."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")  # installed by the test extra; absent from bare GPU images

from galore_kernels import GaLoreAdamW, GaLoreAdamW8bit
from galore_kernels.quant import dequantize_blockwise
from tolerances import BITSANDBYTES_ADAMW8BIT, LOSS_8BIT, TRAJECTORY_8BIT, rel_err


def _regression(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 96, generator=gen)
    return x, x @ torch.randn(96, 160, generator=gen), gen


def _train(cls, seed, gap, **kwargs):
    x, y, gen = _regression(seed)
    torch.manual_seed(seed)
    lin = torch.nn.Linear(96, 160)
    start = lin.weight.detach().clone()
    groups = [
        {"params": [lin.bias]},
        {"params": [lin.weight], "rank": 32, "update_proj_gap": gap, "scale": 1.0},
    ]
    opt = cls(groups, lr=1e-2, eps=1e-8, weight_decay=0.0, **kwargs)
    for _ in range(50):
        idx = torch.randint(0, 512, (64,), generator=gen)
        loss = torch.nn.functional.mse_loss(lin(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return start, lin.weight.detach(), loss.item(), opt.state[lin.weight]


@pytest.mark.parametrize("seed", [0, 1, 2], ids=lambda seed: f"seed{seed}")
def test_8bit_galore_tracks_fp32_galore_over_50_steps(seed):
    start, w32, loss32, state32 = _train(GaLoreAdamW, seed, gap=50)
    _, w8, loss8, state8 = _train(GaLoreAdamW8bit, seed, gap=50, min_8bit_size=256)
    assert state8["exp_avg"].dtype == torch.uint8  # (32 × 160) moments are quantized
    assert torch.equal(state8["projector"], state32["projector"])
    drift = rel_err(w8 - start, w32 - start)  # of the distance travelled
    assert drift <= TRAJECTORY_8BIT, drift
    assert abs(loss8 - loss32) <= LOSS_8BIT * loss32


@pytest.mark.parametrize("seed", [0, 1, 2], ids=lambda seed: f"seed{seed}")
def test_8bit_galore_loss_tracks_fp32_across_refreshes(seed):
    _, _, loss32, _ = _train(GaLoreAdamW, seed, gap=20)
    _, _, loss8, _ = _train(GaLoreAdamW8bit, seed, gap=20, min_8bit_size=256)
    assert abs(loss8 - loss32) <= LOSS_8BIT * loss32


def test_plain_8bit_path_tracks_bitsandbytes_adamw8bit():
    def run(cls):
        gen = torch.Generator().manual_seed(3)
        p = torch.nn.Parameter(torch.randn(64, 128, generator=gen))
        start = p.detach().clone()
        opt = cls([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
        for _ in range(10):
            p.grad = 0.1 * torch.randn(64, 128, generator=gen) + 0.01 * p.detach()
            opt.step()
        return start, p.detach(), opt.state[p]

    start, ours, state = run(GaLoreAdamW8bit)
    _, theirs, bnb_state = run(bnb.optim.AdamW8bit)
    assert rel_err(ours - start, theirs - start) <= BITSANDBYTES_ADAMW8BIT
    # Same layout: flat 256-element blocks, so the states line up element for element.
    assert state["exp_avg"].numel() == bnb_state["state1"].numel()
    assert state["exp_avg_absmax"].numel() == bnb_state["absmax1"].numel()
    m = dequantize_blockwise(state["exp_avg"], state["exp_avg_absmax"], signed=True).flatten()
    m_bnb = bnb.functional.dequantize_blockwise(bnb_state["state1"], absmax=bnb_state["absmax1"], blocksize=256,
                                                code=bnb_state["qmap1"]).flatten()
    assert rel_err(m, m_bnb) <= BITSANDBYTES_ADAMW8BIT
