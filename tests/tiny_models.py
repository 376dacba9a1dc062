"""Tiny models and learnable token data for tests: a Llama small enough to train on a CPU in seconds."""

import torch


def tiny_llama(vocab_size: int = 128, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` small enough to train on a CPU in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2 + hidden_size // 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def synthetic_tokens(batch: int, length: int, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences x[i+1] = (a·x[i] + c) mod vocab with per-sequence (a, c) from a small set: learnable."""
    start = torch.randint(0, vocab_size, (batch, 1), generator=generator)
    mult = torch.randint(1, 4, (batch, 1), generator=generator)
    inc = torch.randint(1, 8, (batch, 1), generator=generator)
    tokens = [start]
    for _ in range(length - 1):
        tokens.append((tokens[-1] * mult + inc) % vocab_size)
    return torch.cat(tokens, dim=1)


def tiny_mixtral(vocab_size: int = 128, hidden_size: int = 32, experts: int = 4, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised ``MixtralForCausalLM``: its experts are 3-D parameters (experts × out × in)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3 // 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return MixtralForCausalLM(config)
