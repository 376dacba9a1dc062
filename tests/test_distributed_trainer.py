"""Real 2-process GaLoreTrainer runs over gloo on CPU, as torchrun would launch them: a plain name (under
Trainer's DDP) and a layer-wise one with gradient accumulation (LayerwiseDataParallel, no DDP). Each
learns, every process ends with the same weights, and a run resumed from its checkpoint ends equal to the
uninterrupted one."""

from __future__ import annotations

import warnings

import pytest
import torch

from rank_results import run_and_load, set_torchrun_environment
from tiny_models import synthetic_tokens, tiny_llama

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

WORLD_SIZE = 2
STEPS, CHECKPOINT = 10, 5
# optim name → gradient_accumulation_steps
RUNS = {"galore_adamw_8bit": 1, "galore_adamw_8bit_layerwise": 2}


def _train(optim: str, output_dir: str, resume: str | None = None) -> tuple[list[torch.Tensor], list[float], float]:
    from transformers import TrainingArguments

    from galore_kernels.integrations.transformers import GaLoreTrainer

    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": t, "labels": t} for t in synthetic_tokens(96, 16, 128, gen)]
    args = TrainingArguments(
        output_dir=output_dir, use_cpu=True, ddp_backend="gloo", ddp_timeout=60, per_device_train_batch_size=4,
        max_steps=STEPS, learning_rate=1e-2, optim=optim, optim_target_modules=["attn", "mlp"],
        gradient_accumulation_steps=RUNS[optim],
        optim_args="rank=8,update_proj_gap=4", logging_steps=1, save_steps=CHECKPOINT, report_to=[], seed=0,
        data_seed=0, disable_tqdm=True, save_only_model=False,
    )
    trainer = GaLoreTrainer(model=tiny_llama(), args=args, train_dataset=data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    norms = [log["grad_norm"] for log in trainer.state.log_history if "loss" in log]
    return [p.detach().clone() for p in trainer.model.parameters()], losses, norms


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    set_torchrun_environment(rank, world_size, port)
    torch.set_num_threads(1)
    # Trainer leaves its process group open: the launcher destroys it when this returns.
    results = {}
    for optim in RUNS:
        full, losses, norms = _train(optim, f"{out_dir}/{optim}")
        resumed, _, _ = _train(optim, f"{out_dir}/{optim}", resume=f"{out_dir}/{optim}/checkpoint-{CHECKPOINT}")
        results[optim] = {"full": full, "resumed": resumed, "losses": losses, "grad_norms": norms}
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("trainer")
    return run_and_load(_worker, WORLD_SIZE, out_dir)


@pytest.mark.slow
@pytest.mark.parametrize("optim", list(RUNS))
def test_two_process_galore_trainer_learns_and_resumes_identically(ranks, optim):
    losses = ranks[0][optim]["losses"]
    assert len(losses) == STEPS and sum(losses[-3:]) / 3 < 0.95 * losses[0]
    for result in ranks:
        assert all(torch.equal(a, b) for a, b in zip(result[optim]["full"], ranks[0][optim]["full"]))
        assert all(torch.equal(a, b) for a, b in zip(result[optim]["resumed"], result[optim]["full"]))


@pytest.mark.slow
def test_layerwise_grad_norm_is_logged_and_equal_on_every_process(ranks):
    norms = [result["galore_adamw_8bit_layerwise"]["grad_norms"] for result in ranks]
    assert all(norm > 0 for norm in norms[0]) and norms[0] == norms[1]
