"""Tiny random transformers models, a word-level tokenizer, and brute-force laws for the decoding tests.

Nothing is downloaded: models are built from configs with a fixed seed.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stats_helpers import chi_square_from_counts


def tiny_llama(vocab_size: int = 12, seed: int = 0, *, hidden_size: int = 16, num_hidden_layers: int = 1,
               logit_scale: float = 1.0, max_position_embeddings: int = 64, attn_implementation: str = "sdpa",
               initializer_range: float = 0.1) -> LlamaForCausalLM:
    """A random Llama; ``logit_scale`` multiplies the output layer (peakier distributions)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=max_position_embeddings,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, initializer_range=initializer_range,
    )
    config._attn_implementation = attn_implementation
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return model


def trio(vocab_size: int = 10, *, num_hidden_layers: int = 1, scales=(1.0, 3.0, 3.0), seeds=(1, 2, 3), **kwargs):
    """(target q, aligned draft r, reference draft d) sharing one vocabulary."""
    return tuple(
        tiny_llama(vocab_size, seed, num_hidden_layers=num_hidden_layers, logit_scale=scale, **kwargs)
        for seed, scale in zip(seeds, scales)
    )


@torch.no_grad()
def full_logits(model, ids: list[int]) -> torch.Tensor:
    """No-cache logits of the last position of ``ids``. Shape: -> (V,) float64"""
    out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0, -1].double()


def tilted_probs(zq, zr, zd, temperature: float = 1.0, shift: float = 1.0) -> torch.Tensor:
    """p* = softmax(zq/t + shift*(zr/t - zd/t)) in float64."""
    scores = zq / temperature + shift * (zr / temperature - zd / temperature)
    return torch.softmax(scores.double(), dim=-1)


@torch.no_grad()
def sequence_law(models, prompt: list[int], length: int, step_law, eos: int | None = None,
                 processor=None) -> dict[tuple, float]:
    """Exact law of the generated continuation of ``prompt``, by enumeration of every prefix.

    ``step_law(*logits_per_model) -> probs`` maps the models' float64 logits (N, V) of all
    prefixes of one length to the next-token law (N, V); a sequence ending in ``eos`` stops there.
    ``processor(input_ids, logits) -> logits``, when given, first maps every model's logits
    given the prefixes ``prompt + prefix`` (N, L).
    """
    vocab_size = models[0].config.vocab_size
    prefixes = [()]
    mass = {(): 1.0}
    law: dict[tuple, float] = {}
    for _ in range(length):
        ids = torch.tensor([list(prompt) + list(p) for p in prefixes])
        logits = [m(input_ids=ids, use_cache=False).logits[:, -1].double() for m in models]
        if processor is not None:
            logits = [processor(ids, z) for z in logits]
        probs = step_law(*logits)
        next_prefixes = []
        for row, prefix in enumerate(prefixes):
            for token in range(vocab_size):
                p = mass[prefix] * float(probs[row, token])
                if p <= 0:
                    continue
                sequence = prefix + (token,)
                if eos is not None and token == eos:
                    law[sequence] = p
                else:
                    mass[sequence] = p
                    next_prefixes.append(sequence)
        prefixes = next_prefixes
    for prefix in prefixes:
        law[prefix] = mass[prefix]
    return law


def chi_square_pvalue(counts: dict[tuple, int], law: dict[tuple, float]) -> float:
    """Goodness of fit of sequence ``counts`` to ``law`` (a sequence outside the law gives p = 0)."""
    if any(key not in law for key in counts):
        return 0.0
    keys = list(law)
    return chi_square_from_counts(np.array([counts.get(key, 0) for key in keys], dtype=float),
                                  np.array([law[key] for key in keys], dtype=float))


def count_sequences(sequences) -> dict[tuple, int]:
    counts: dict[tuple, int] = {}
    for seq in sequences:
        key = tuple(int(t) for t in seq)
        counts[key] = counts.get(key, 0) + 1
    return counts


@torch.no_grad()
def greedy_reference(models, prompt: list[int], length: int, combine, eos: int | None = None) -> list[int]:
    """Greedy decoding without cache of ``argmax(combine(*logits))``."""
    out = []
    for _ in range(length):
        logits = [full_logits(m, prompt + out) for m in models]
        token = int(torch.argmax(combine(*logits)))
        out.append(token)
        if eos is not None and token == eos:
            break
    return out


def word_tokenizer(vocab_size: int = 12):
    """A word-level fast tokenizer over ``vocab_size`` symbols: <pad>, <eos>, then words w2, w3, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1}
    for index in range(2, vocab_size):
        vocab[f"w{index}"] = index
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<pad>")
    return tokenizer


def sum_reward(token: int):
    """Reward callable over token-id tensors: number of occurrences of ``token``."""

    def reward(sequences):
        return [float((seq == token).sum()) for seq in sequences]

    return reward


def log_sum_exp(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def all_sequences(vocab_size: int, length: int):
    return itertools.product(range(vocab_size), repeat=length)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; imported by the decoding test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_tiny_models(root) -> dict:
    """The tiny target / draft / reference (vocabulary 12, EOS 1) and a word tokenizer saved under
    ``root``: ``{"target", "draft", "ref"}`` -> directory, as the command line loads them."""
    tokenizer = word_tokenizer(12)
    paths = {}
    for name, model in zip(("target", "draft", "ref"), trio(12)):
        model.config.eos_token_id = 1
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths
