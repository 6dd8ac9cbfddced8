"""A real (if tiny) causal-LM task for trainer tests: a character-level tokenizer with a chat template, and a
randomly initialised llama small enough that a GRPO step takes well under a second on one CPU core."""
from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from grpo.models import tiny_llama

SPECIALS = ["<|im_end|>", "<|im_start|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def char_tokenizer() -> PreTrainedTokenizerFast:
    chars = list(dict.fromkeys(string.printable))  # digits, letters, punctuation, whitespace
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_policy(seed: int = 0) -> torch.nn.Module:
    return tiny_llama(vocab_size=len(char_tokenizer()), hidden=32, layers=2, heads=2, seed=seed)


def lowercase_reward(completions: list[str], samples: list[dict]) -> list[float]:
    """Fraction of completion characters that are lowercase letters: optimum 1.0, ~0.26 for a uniform policy."""
    return [sum(c in string.ascii_lowercase for c in text) / max(len(text), 1) for text in completions]
