"""GaLoreTrainer with Trainer's FSDP2 settings (``fsdp=True, fsdp_config={"version": 2, ...}``) on 2
processes: accelerate's own FSDP2 prepare shards the model and swaps the sharded parameters into our
optimizer after it was built, and Trainer checkpoints the sharded state through DCP.

Accelerate runs FSDP only on accelerator devices: on CPU processes it drops the plugin and trains under
DDP, so GaLoreTrainer warns there (tested below). To run its FSDP2 path on CPU, ``_CpuFsdpTrainer`` puts
the plugin back into accelerate's state right after Trainer built it; everything after that (prepare,
fully_shard, the training loop, DCP checkpoints) is accelerate's and Trainer's unchanged code. The
cuda-marked variant runs the same worker on 2 GPUs over NCCL without that step.
"""

from __future__ import annotations

import warnings
import weakref

import pytest
import torch
from torch.distributed.tensor import DTensor

from rank_results import run_and_load, run_on_gpus_and_load, set_torchrun_environment
from tiny_models import synthetic_tokens, tiny_llama

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

WORLD_SIZE = 2
STEPS, CHECKPOINT, ACCUMULATION = 8, 4, 2
NAMES = ("galore_adamw_8bit", "galore_adamw_8bit_layerwise")
# Sharded checkpoints (DCP): the model's full state dict is gathered for safetensors otherwise.
FSDP_CONFIG = {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "state_dict_type": "SHARDED_STATE_DICT"}
REPLACED = "were replaced after it was built"  # step()'s warning for parameters it had to hook itself


def _trainer_class(device_type: str):
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from galore_kernels.integrations.transformers import GaLoreTrainer

    class _CpuFsdpTrainer(GaLoreTrainer):
        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            state = self.accelerator.state
            if getattr(state, "fsdp_plugin", None) is None:
                state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            # Every AcceleratorState() copies PartialState's type over its own: set both.
            state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True

    return _CpuFsdpTrainer if device_type == "cpu" else GaLoreTrainer


def _args(output_dir: str, optim: str, device_type: str, fsdp: bool = True):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, use_cpu=device_type == "cpu", ddp_backend="gloo" if device_type == "cpu" else "nccl",
        ddp_timeout=60, per_device_train_batch_size=4, max_steps=STEPS, learning_rate=1e-2, optim=optim,
        optim_target_modules=["attn", "mlp"], optim_args="rank=8,update_proj_gap=3",
        gradient_accumulation_steps=ACCUMULATION, max_grad_norm=0.0, logging_steps=1, save_steps=CHECKPOINT,
        report_to=[], seed=0, data_seed=0, disable_tqdm=True, save_only_model=False,
        fsdp=fsdp, fsdp_config=FSDP_CONFIG if fsdp else None,
    )


def _data() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": t, "labels": t} for t in synthetic_tokens(96, 16, 128, gen)]


def _train(optim: str, output_dir: str, device_type: str, resume: str | None = None) -> dict:
    model = tiny_llama()
    originals = [weakref.ref(p) for p in model.parameters()]
    trainer = _trainer_class(device_type)(model=model, args=_args(output_dir, optim, device_type), train_dataset=_data())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=resume)
    optimizer = trainer.optimizer.optimizer  # accelerate's AcceleratedOptimizer wraps ours
    params = [p for group in optimizer.param_groups for p in group["params"]]
    hooks = optimizer.layerwise_hooks
    return {
        "weights": [p.detach().full_tensor().cpu() for p in trainer.model.parameters()],
        "losses": [log["loss"] for log in trainer.state.log_history if "loss" in log],
        "sharded": all(isinstance(p, DTensor) for p in params),
        "hooked_sharded": None if hooks is None else sorted(map(id, (p for _, p in hooks.hooked()))) == sorted(map(id, params)),
        "accumulation_steps": optimizer.accumulation_steps,
        "originals_alive": sum(ref() is not None for ref in originals),
        "replaced_warnings": sum(REPLACED in str(w.message) for w in caught),
    }


def _cpu_fsdp_is_ignored(output_dir: str) -> list[str]:
    """Plain GaLoreTrainer with TrainingArguments.fsdp on CPU processes: what it warns when building."""
    from galore_kernels.integrations.transformers import GaLoreTrainer

    trainer = GaLoreTrainer(model=tiny_llama(), args=_args(output_dir, NAMES[0], "cpu"), train_dataset=_data())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.create_optimizer()
    return [str(w.message) for w in caught]


def _worker(rank: int, world_size: int, port: int, out_dir: str, device_type: str = "cpu") -> None:
    set_torchrun_environment(rank, world_size, port)
    torch.set_num_threads(1)
    # Trainer leaves its process group open: the launcher destroys it when this returns.
    results = {}
    if device_type == "cpu":
        results["ignored"] = _cpu_fsdp_is_ignored(f"{out_dir}/ignored")
    for optim in NAMES:
        results[optim] = _train(optim, f"{out_dir}/{optim}", device_type)
        checkpoint = f"{out_dir}/{optim}/checkpoint-{CHECKPOINT}"
        results[f"{optim}/resumed"] = _train(optim, f"{out_dir}/{optim}", device_type, resume=checkpoint)
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp_trainer")
    return run_and_load(_worker, WORLD_SIZE, out_dir)


@pytest.fixture(scope="module")
def cuda_ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp_trainer_cuda")
    return run_on_gpus_and_load(_worker, WORLD_SIZE, out_dir)


def _check_runs(ranks: list[dict]) -> None:
    plain, layerwise = NAMES
    for result in ranks:
        for optim in NAMES:
            run = result[optim]
            assert run["sharded"], f"{optim}: the optimizer does not hold the sharded parameters"
            assert run["originals_alive"] == 0, f"{optim}: the unsharded parameters are still referenced"
            assert len(run["losses"]) == STEPS and sum(run["losses"][-3:]) / 3 < 0.95 * run["losses"][0], optim
            # The run resumed from the step-4 checkpoint (DCP, sharded state) ends where the whole run ends.
            assert all(torch.equal(a, b) for a, b in zip(result[f"{optim}/resumed"]["weights"], run["weights"])), optim
            assert all(torch.equal(a, b) for a, b in zip(run["weights"], ranks[0][optim]["weights"])), optim
        # Layer-wise: hooks on the sharded parameters from the first backward pass (GaLoreTrainer re-hooks
        # after accelerate's prepare), each window's gradient arriving once, already summed by FSDP2.
        assert result[layerwise]["hooked_sharded"] and result[layerwise]["replaced_warnings"] == 0
        assert result[layerwise]["accumulation_steps"] == 1
        assert result[layerwise]["losses"] == result[plain]["losses"]


@pytest.mark.slow
def test_galore_trainer_under_accelerate_fsdp2_learns_resumes_and_steps_layerwise(ranks):
    _check_runs(ranks)
    assert all(torch.equal(a, b) for a, b in zip(ranks[0][NAMES[1]]["weights"], ranks[0][NAMES[0]]["weights"]))


@pytest.mark.slow
def test_fsdp_arguments_on_cpu_processes_warn_that_accelerate_ignores_them(ranks):
    for result in ranks:
        assert any("accelerate runs FSDP only on GPUs" in message for message in result["ignored"])


@pytest.mark.cuda
def test_galore_trainer_under_fsdp2_on_two_gpus(cuda_ranks):
    _check_runs(cuda_ranks)
