"""A text corpus made on the spot, and a character tokenizer: training data without downloads.

The text comes from a small English grammar with agreement (a singular subject takes "sees", a plural one
"see"), fixed facts ("the capital of Varn is Teluma") that recur across the corpus, and counting
sentences. A model has short-range spelling, agreement across a few words and memorised facts to learn,
so loss keeps falling for a few hundred steps instead of flattening after the first dozen. The same
seed gives the same text on every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

__all__ = ["make_corpus", "CharTokenizer", "TokenSplits", "split_tokens"]

_SINGULAR = ["the cat", "a dog", "my friend", "the old man", "the teacher", "a small bird", "the child", "she", "he"]
_PLURAL = ["the cats", "two dogs", "my friends", "the farmers", "the children", "they", "we", "the birds"]
_VERBS = [("sees", "see"), ("likes", "like"), ("finds", "find"), ("follows", "follow"), ("paints", "paint"),
          ("carries", "carry"), ("watches", "watch"), ("remembers", "remember")]
_OBJECTS = ["the red house", "a green apple", "the river", "an old book", "the quiet garden", "a blue boat",
            "the long road", "a warm loaf of bread", "the tall tree", "a bright lamp"]
_PLACES = ["in the morning", "near the sea", "after the rain", "before dinner", "under the bridge",
           "at the market", "on the hill", "every winter"]
_ADVERBS = ["slowly", "often", "never", "happily", "quietly", "always"]
_COUNTRIES = ["Varn", "Osk", "Melida", "Tarrow", "Quen", "Ibbel", "Sorra", "Dunmar"]
_CITIES = ["Teluma", "Riga Nor", "Pell", "Ashmoor", "Kest", "Lunetta", "Orvik", "Fane"]
_NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _sentence(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.15:  # a fact: the same pairing every time
        i = rng.randrange(len(_COUNTRIES))
        return f"the capital of {_COUNTRIES[i]} is {_CITIES[i]}."
    if kind < 0.25:  # counting: the next numbers follow
        start = rng.randrange(len(_NUMBERS) - 3)
        return ", ".join(_NUMBERS[start:start + rng.randint(3, len(_NUMBERS) - start)]) + "."
    plural = rng.random() < 0.5
    subject = rng.choice(_PLURAL if plural else _SINGULAR)
    if subject in ("they", "we"):
        plural = True
    verb = rng.choice(_VERBS)[1 if plural else 0]
    words = [subject]
    if rng.random() < 0.3:
        words.append(rng.choice(_ADVERBS))
    words += [verb, rng.choice(_OBJECTS)]
    if rng.random() < 0.5:
        words.append(rng.choice(_PLACES))
    sentence = " ".join(words)
    if rng.random() < 0.2:  # a second clause, which agrees with its own subject
        other = rng.choice(_SINGULAR)
        sentence += f" and {other} {rng.choice(_VERBS)[0]} {rng.choice(_OBJECTS)}"
    return sentence + "."


def make_corpus(characters: int = 400_000, seed: int = 0) -> str:
    """About ``characters`` characters of generated text, sentences capitalised, paragraphs of 3–7."""
    rng = random.Random(seed)
    paragraphs, size = [], 0
    while size < characters:
        paragraph = " ".join(s[0].upper() + s[1:] for s in (_sentence(rng) for _ in range(rng.randint(3, 7))))
        paragraphs.append(paragraph)
        size += len(paragraph) + 1
    return "\n".join(paragraphs)


class CharTokenizer:
    """One token per distinct character of a text."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self._index = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self._index[c] for c in text], dtype=torch.long)

    def decode(self, tokens: torch.Tensor) -> str:
        return "".join(self.chars[i] for i in tokens.tolist())


@dataclass(frozen=True)
class TokenSplits:
    """Training and validation token streams of one corpus."""

    train: torch.Tensor
    validation: torch.Tensor


def split_tokens(tokens: torch.Tensor, validation_fraction: float = 0.1) -> TokenSplits:
    """The last ``validation_fraction`` of the stream is held out (text the model never trains on)."""
    cut = int(len(tokens) * (1.0 - validation_fraction))
    return TokenSplits(tokens[:cut], tokens[cut:])
