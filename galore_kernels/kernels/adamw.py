"""The AdamW step of parameters without projection (fp32 or 8-bit moments), many tensors per launch.

Reference: :func:`galore_kernels.reference.adamw`.

A group's biases, norms and embeddings are many small tensors; launching per tensor costs more than the
work. One launch covers them all: the host passes tables of their addresses, sizes and step sizes, and a
block table mapping each program to (tensor, block). Every program updates one block of one tensor: 256
elements for 8-bit moments (one absmax, bitsandbytes' flat layout), 1024 for fp32 moments.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from ..config import AdamHyper
from ..quant import BLOCK_SIZE
from .common.codebook import code_tables, dequantize_rows, quantize_rows
from .common.rounding import round_to
from .common.runtime import interpreting, on_device

FP32_BLOCK = 1024


@triton.jit
def _adamw_kernel(
    w_table, g_table, m_table, v_table, m_absmax_table, v_absmax_table,
    numel_table, step_size_table, block_tensor, block_index,
    w_like, g_like, m_like,
    signed_map_ptr, signed_mids_ptr, unsigned_map_ptr, unsigned_mids_ptr,
    beta1, beta2, eps, decay,
    QUANTIZED: tl.constexpr, SOFTWARE_BF16_ROUNDING: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tensor = tl.load(block_tensor + pid).to(tl.int64)
    block = tl.load(block_index + pid).to(tl.int64)
    numel = tl.load(numel_table + tensor)
    step_size = tl.load(step_size_table + tensor)
    # Addresses become typed pointers; the *_like arguments carry the element types.
    w_ptr = tl.load(w_table + tensor).to(w_like.dtype)
    g_ptr = tl.load(g_table + tensor).to(g_like.dtype)
    m_ptr = tl.load(m_table + tensor).to(m_like.dtype)
    v_ptr = tl.load(v_table + tensor).to(m_like.dtype)

    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if QUANTIZED:
        m_absmax_ptr = tl.load(m_absmax_table + tensor).to(tl.pointer_type(tl.float32))
        v_absmax_ptr = tl.load(v_absmax_table + tensor).to(tl.pointer_type(tl.float32))
        m_codes = tl.reshape(tl.load(m_ptr + offs, mask=mask, other=0), (1, BLOCK))
        v_codes = tl.reshape(tl.load(v_ptr + offs, mask=mask, other=0), (1, BLOCK))
        one = tl.arange(0, 1)
        m_absmax = tl.reshape(tl.load(m_absmax_ptr + block + one), (1, 1))
        v_absmax = tl.reshape(tl.load(v_absmax_ptr + block + one), (1, 1))
        m = tl.reshape(dequantize_rows(m_codes, m_absmax, signed_map_ptr, BLOCK, 1, BLOCK), (BLOCK,))
        v = tl.reshape(dequantize_rows(v_codes, v_absmax, unsigned_map_ptr, BLOCK, 1, BLOCK), (BLOCK,))
        m = tl.where(mask, m, 0.0)  # masked code 0 is -0.99 on the signed map
        v = tl.where(mask, v, 0.0)
    else:
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)

    m = m * beta1 + g * (1.0 - beta1)
    v = v * beta2 + g * g * (1.0 - beta2)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = w * decay - step_size * tl.math.div_rn(m, tl.math.sqrt_rn(v) + eps)  # IEEE, as the reference
    tl.store(w_ptr + offs, round_to(w, w_like.dtype.element_ty, SOFTWARE_BF16_ROUNDING), mask=mask)

    if QUANTIZED:
        m_codes, m_absmax = quantize_rows(tl.reshape(m, (1, BLOCK)), signed_mids_ptr, BLOCK, 1, BLOCK)
        v_codes, v_absmax = quantize_rows(tl.reshape(v, (1, BLOCK)), unsigned_mids_ptr, BLOCK, 1, BLOCK)
        tl.store(m_ptr + offs, tl.reshape(m_codes, (BLOCK,)), mask=mask)
        tl.store(v_ptr + offs, tl.reshape(v_codes, (BLOCK,)), mask=mask)
        tl.store(m_absmax_ptr + block + one, tl.reshape(m_absmax, (1,)))
        tl.store(v_absmax_ptr + block + one, tl.reshape(v_absmax, (1,)))
    else:
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)


@functools.lru_cache(maxsize=64)
def _block_map(numels: tuple[int, ...], block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor of each program, block of each program) for tensors of these sizes, built on the host
    once per set of sizes: a parameter group's sizes do not change between steps."""
    counts = torch.tensor([triton.cdiv(n, block) for n in numels], dtype=torch.int64)
    block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
    block_index = torch.cat([torch.arange(c, dtype=torch.int32) for c in counts.tolist()])
    return block_tensor.to(device), block_index.to(device)


def adamw(
    params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]], hyper: AdamHyper
) -> None:
    """One AdamW step for tensors sharing device, dtypes and moment format, in a single launch.

    Parameters must be contiguous; gradients are made contiguous if they are not. Moments are updated
    in place in the states' own layout (param-shaped fp32, or (1, numel) codes with (1, blocks) absmax),
    and each state's ``step`` advances. Per step the host sends one table of addresses and sizes and one
    of step sizes; nothing waits on the GPU.
    """
    if not params:
        return
    device = params[0].device
    quantized = "exp_avg_absmax" in states[0]
    block = BLOCK_SIZE if quantized else FP32_BLOCK
    grads = [g.contiguous() for g in grads]  # keeps the references alive until the launch is queued
    m_states = [s["exp_avg"] for s in states]
    v_states = [s["exp_avg_sq"] for s in states]
    columns = [params, grads, m_states, v_states]
    if quantized:
        columns += [[s["exp_avg_absmax"] for s in states], [s["exp_avg_sq_absmax"] for s in states]]
    else:
        columns += [params, params]  # unused by the fp32 kernel
    numels = tuple(p.numel() for p in params)
    addresses = [[t.data_ptr() for t in column] for column in columns]
    host_table = torch.tensor(addresses + [list(numels)], dtype=torch.int64)
    table = host_table.to(device)
    block_tensor, block_index = _block_map(numels, block, device)
    step_sizes = [hyper.step_size(s["step"]) for s in states]
    if block_tensor.numel() == 0:  # empty tensors: nothing to update, but their step still counts
        _advance_steps(states)
        return
    signed_map, signed_mids = code_tables(True, device)
    unsigned_map, unsigned_mids = code_tables(False, device)
    with on_device(params[0]):
        _adamw_kernel[(block_tensor.numel(),)](
            *table,
            torch.tensor(step_sizes, dtype=torch.float32).to(device),
            block_tensor, block_index,
            params[0], grads[0], m_states[0],
            signed_map, signed_mids, unsigned_map, unsigned_mids,
            hyper.beta1, hyper.beta2, hyper.eps, hyper.decay,
            QUANTIZED=quantized, SOFTWARE_BF16_ROUNDING=interpreting(), BLOCK=block,
        )
    _advance_steps(states)  # only once the launch is queued: a failed launch leaves the steps as they were


def _advance_steps(states: list[dict[str, Any]]) -> None:
    for s in states:
        s["step"] += 1
