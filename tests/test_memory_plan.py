"""The memory planner: the GaLore paper's Llama-7B figures, real optimizer state bytes, the CLI's errors."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from case_ids import named_by_inputs  # noqa: E402
from galore_kernels import GaLoreAdamW, GaLoreAdamW8bit  # noqa: E402
from galore_kernels.cli import main  # noqa: E402
from galore_kernels.optim.param_groups import galore_param_groups  # noqa: E402
from galore_kernels.training.memory_plan import (  # noqa: E402
    MODES,
    PAPER_LLAMA_7B,
    build_meta_model,
    causal_lm_config,
    model_config,
    plan_memory,
    state_bytes,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices gain nothing from a second thread, and on a shared 2-core machine OpenMP's waiting
    threads made one 48 × 256 SVD take 1 s instead of 1 ms (this file: 28 s with 2 threads, 6 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama_7b_plan():
    return plan_memory(build_meta_model(model_config("llama-7b"), torch.bfloat16), rank=1024)


def test_llama_7b_within_10_percent_of_the_paper(llama_7b_plan):
    assert llama_7b_plan.num_params == 6_738_415_616  # Llama(-2)-7B's published count
    for mode, paper in PAPER_LLAMA_7B.items():
        total = llama_7b_plan.mode(mode).total
        assert abs(total / paper - 1) < 0.10, (mode, total / 1e9, paper / 1e9)
    # The paper's BF16 breakdown: 14 GB weights, 42 GB optimizer state and gradients, 2 GB activations.
    adamw = llama_7b_plan.mode("AdamW")
    assert abs(adamw.weights / 14e9 - 1) < 0.05
    assert abs((adamw.optimizer_state + adamw.gradients) / 42e9 - 1) < 0.05
    assert 1e9 < adamw.activations < 2.5e9


def test_layerwise_gradient_is_the_largest_parameter(llama_7b_plan):
    assert llama_7b_plan.largest_gradient in ("model.embed_tokens.weight", "lm_head.weight")
    assert llama_7b_plan.mode("8-bit GaLore layer-wise").gradients == 32000 * 4096 * 2


def _tiny_llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    # intermediate 256 at rank 16 makes MLP moments (16, 256) = 4096 elements: 8-bit; attention's stay fp32.
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return config, LlamaForCausalLM(config).to(dtype)


def _optimizer(mode, model):
    groups = galore_param_groups(model, ["attn", "mlp"], rank=16)
    return {
        "AdamW": lambda: torch.optim.AdamW(model.parameters(), lr=1e-3),
        "8-bit Adam": lambda: GaLoreAdamW8bit([{"params": list(model.parameters())}], lr=1e-3),
        "GaLore": lambda: GaLoreAdamW(groups, lr=1e-3),
        "8-bit GaLore": lambda: GaLoreAdamW8bit(groups, lr=1e-3),
        "8-bit GaLore layer-wise": lambda: GaLoreAdamW8bit(groups, lr=1e-3, layerwise=True),
    }[mode]()


def _nbytes(tensor):
    return tensor.numel() * tensor.element_size()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("mode", MODES)
def test_plan_equals_real_state_bytes(mode, dtype):
    config, model = _tiny_llama(dtype)
    row = plan_memory(build_meta_model(config, dtype), rank=16).mode(mode)
    params = list(model.parameters())
    # Registered before the optimizer's layer-wise hooks, so it runs first and sees every gradient alive.
    live_peak = [0]

    def record(_):
        live = sum(_nbytes(p.grad) for p in params if p.grad is not None)
        live_peak[0] = max(live_peak[0], live)

    handles = [p.register_post_accumulate_grad_hook(record) for p in params]
    optimizer = _optimizer(mode, model)
    tokens = torch.randint(0, 128, (2, 16))
    model(input_ids=tokens, labels=tokens).loss.backward()
    if mode != "8-bit GaLore layer-wise":
        assert row.gradients == sum(_nbytes(p.grad) for p in params)
    assert row.gradients == live_peak[0]
    optimizer.step()
    for handle in handles:
        handle.remove()
    assert len(optimizer.state) == len(params)
    assert row.optimizer_state == sum(state_bytes(state) for state in optimizer.state.values())
    assert row.weights == sum(_nbytes(p) for p in params)
    if mode in ("8-bit GaLore", "8-bit GaLore layer-wise"):  # both 8-bit and fp32 GaLore moments occur
        kinds = {state["exp_avg"].dtype for p, state in optimizer.state.items() if "projector" in state}
        assert kinds == {torch.uint8, torch.float32}


def test_cli_prints_the_table(capsys):
    assert main(["memory", "--model", "llama-7b", "--rank", "1024"]) == 0
    out = capsys.readouterr().out
    for mode in MODES:
        assert mode in out
    assert "6.74 B parameters" in out and "rank 1024" in out
    assert "58.0" in out and "21.3" in out
    assert "note:" not in out and "text model" not in out  # rank 1024 < 4096: nothing clamped, GaLore saves
    assert max(len(line) for line in out.splitlines()) <= 100
    assert "low-rank hook 1,881,411,584 (27.9%)" in out


def test_plan_counts_the_weights_whose_rank_is_clamped():
    config, _ = _tiny_llama(torch.bfloat16)
    model = build_meta_model(config, torch.bfloat16)
    # Per layer: q, o (64 x 64), k, v (32 x 64), gate, up (256 x 64), down (64 x 256); 2 layers.
    for rank, full_rank, lowest in ((16, 0, 16), (32, 4, 32), (64, 14, 32), (1000, 14, 32)):
        plan = plan_memory(model, rank=rank)
        assert (plan.full_rank, plan.min_effective_rank) == (full_rank, lowest), rank
    # At full rank GaLore keeps fp32 moments of the whole matrix plus a projector: more than AdamW's bf16.
    assert plan.mode("GaLore").optimizer_state > plan.mode("AdamW").optimizer_state


def _config_file(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_text(text)
    return str(path)


def test_cli_reads_a_config_folder(tmp_path, capsys):
    fields = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "vocab_size": 128, "transformers_version": "4.28.1"}
    _config_file(tmp_path, json.dumps(fields))
    assert main(["memory", "--model", str(tmp_path), "--dtype", "fp32", "--tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "rank 16" in out and "fp32" in out and "paper" not in out


TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "vocab_size": 128}


def test_cli_notes_a_clamped_rank_and_no_saving(tmp_path, capsys):
    path = _config_file(tmp_path, json.dumps(TINY_LLAMA))
    assert main(["memory", "--model", path, "--rank", "128"]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert notes == [
        ("note: rank 128 is clamped on 14 of 14 projected weights (min(m, n) ≤ rank; effective rank down to 64): "
         "no compression there."),
        "note: GaLore's optimizer state is 2.29× AdamW's at rank 128: GaLore saves nothing here.",
        "note: 8-bit GaLore's optimizer state is 1.59× 8-bit Adam's at rank 128: 8-bit GaLore saves nothing here.",
    ]
    assert out.index("8-bit GaLore layer-wise") < out.index(notes[0])  # under the table

    # Rank 16 (hidden_size // 4): GaLore saves, but 8-bit GaLore's 16 x 128 moments are below min_8bit_size
    # and stay fp32, while 8-bit Adam quantizes the whole 64 x 128 ones.
    assert main(["memory", "--model", path]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: 8-bit GaLore's optimizer state is 1.13× 8-bit Adam's at rank 16: 8-bit GaLore saves nothing here."
    ]


VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
          "image_size": 28, "patch_size": 14}
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256}
MULTIMODAL = {
    "gemma3": {"text_config": {"model_type": "gemma3_text", **TEXT},
               "vision_config": {"model_type": "siglip_vision_model", **VISION}},
    "llama4": {"text_config": {"model_type": "llama4_text", "intermediate_size_mlp": 128, "num_local_experts": 2,
                               **TEXT},
               "vision_config": {"model_type": "llama4_vision_model", **VISION}},
}


@pytest.mark.parametrize("model_type", MULTIMODAL)
def test_a_multimodal_config_is_planned_as_its_text_model(model_type, tmp_path, capsys):
    _config_file(tmp_path, json.dumps({"model_type": model_type, **MULTIMODAL[model_type]}))
    config = model_config(str(tmp_path))
    assert config.model_type == model_type and causal_lm_config(config).model_type == f"{model_type}_text"
    model = build_meta_model(config, torch.bfloat16)
    assert type(model).__name__.endswith("ForCausalLM")
    assert not [name for name, _ in model.named_parameters() if "vision" in name]
    assert main(["memory", "--model", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"({model_type}, text model {model_type}_text)" in out and "rank 16" in out
    assert "text model: a multimodal config; its vision tower and projector are not counted." in out


@pytest.mark.parametrize(
    "args, message",
    named_by_inputs([
        (["--model", "nope"], "neither a preset"),
        (["--model", "llama-7b", "--rank", "0"], "--rank must be"),
        (["--model", "llama-7b", "--rank", "-3"], "--rank must be"),
        (["--model", "llama-7b", "--tokens", "0"], "--tokens must be"),
        (["--model", "{tmp}/missing/config.json"], "neither a preset"),
        (["--model", "{tmp}"], "folder without a config.json"),
        (["--model", "{tmp}/config.json", "{file}", "{"], "invalid JSON"),
        (["--model", "{tmp}/config.json", "{file}", '{"hidden_size": 64}'], "model_type"),
        (["--model", "{tmp}/config.json", "{file}", '{"model_type": "nope"}'], "unknown model_type"),
        (["--model", "{tmp}/config.json", "{file}", '{"model_type": "t5"}'], "no causal-LM model"),
        (["--model", "{tmp}/config.json", "{file}", '{"model_type": "qwen2_5_vl"}'],
         "model_type 'qwen2_5_vl' (text model 'qwen2_5_vl_text') has no causal-LM model"),
        (["--model", "{tmp}/config.json", "{file}", '{"model_type": "gemma3", "text_config": {"hidden_size": "x"}}'],
         "invalid gemma3 config"),
        (["--model", "{tmp}/config.json", "{file}", '{"model_type": "llama", "vocab_size": "x"}'], "invalid llama"),
        (["--model", "llama-1b", "--target-modules", "nothing_matches"], "matches no nn.Linear"),
    ]),
)
def test_cli_bad_input_is_one_line(tmp_path, capsys, args, message):
    if "{file}" in args:
        _config_file(tmp_path, args[-1])
        args = args[:-2]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["memory", *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in err and message in err, err
    assert err.startswith("galore-kernels memory: error:")
    assert captured.out == ""


def test_mixtral_experts_are_projected_and_8bit_galore_state_is_below_8bit_adam(tmp_path, capsys):
    config = {
        "model_type": "mixtral", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2,
        "vocab_size": 1024, "tie_word_embeddings": False,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    plan = plan_memory(build_meta_model(model_config(str(path)), torch.bfloat16), rank=32)
    # Each layer has two expert stacks (8 × 1024 × 256 and 8 × 256 × 512), each counted in full.
    assert plan.projected_params >= 2 * 8 * (1024 * 256 + 256 * 512)
    assert plan.mode("8-bit GaLore").optimizer_state < plan.mode("8-bit Adam").optimizer_state
    assert plan.mode("GaLore").optimizer_state < plan.mode("AdamW").optimizer_state


def test_low_rank_communication_of_llama_7b_at_rank_512_is_below_a_sixth_of_plain_ddp():
    plan = plan_memory(build_meta_model(model_config("llama-7b"), torch.bfloat16), rank=512)
    assert plan.allreduce_plain == plan.num_params == 6_738_415_616
    # By hand: 32 layers × (4 attention 4096² weights → 512 × 4096 each, 3 MLP 4096 × 11008 weights →
    # 512 × 11008 each) + embeddings, head and norms whole = 1,071,910,912.
    assert plan.allreduce_low_rank == 1_071_910_912
    assert plan.allreduce_low_rank <= plan.allreduce_plain / 6
