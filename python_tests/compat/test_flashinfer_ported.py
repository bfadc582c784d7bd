"""FlashInfer's own test cases for chain_speculative_sampling, ported to
sss_ext.compat.flashinfer (the code is this project's): batch 1, 99, 989; vocab 111, 32000,
128256; 1, 3, 5, 7 draft tokens; random or one-hot targets. A one-hot target at the draft ids
(and a random bonus id) must come back exactly; otherwise the ids lie in [0, V), the mismatches
with the drafts are contiguous and -1 follows the first one, and ``emitted + 1`` counts the
emitted tokens, over 10 trials whose counters accumulate. Plus FlashInfer's docstring example,
whose output is certain.

The CPU cannot hold the largest cases (989 x 8 x 128256 float32 is 4 GB per tensor, and the
call holds about five such): the default run takes every vocabulary and draft length at batch
1, vocab 111 at every batch size, and the largest batch at vocab 111 (26 cases); the others up
to 1.1e8 probabilities per tensor are marked slow, the rest are skipped on the CPU (a GPU run
takes them all). On the CPU, cases above 2e7 probabilities per tensor run 3 trials instead of
10 (each trial of the largest takes ~10 s there)."""

import pytest
import torch

from sss_ext.compat.flashinfer import chain_speculative_sampling

CPU_LIMIT = 110_000_000  # about 0.45 GB per float32 tensor, ~3 GB for the whole call
CPU_FEW_TRIALS = 20_000_000  # above it, 3 trials on the CPU

CASES = [(batch, vocab, k, onehot) for batch in (1, 99, 989) for vocab in (111, 32000, 128256) for k in (1, 3, 5, 7)
         for onehot in (False, True)]


def in_default_run(batch, vocab, k):
    return (batch == 1 and (vocab == 111 or k in (1, 7))) or (batch == 99 and vocab == 111) or (batch, vocab, k) == (989, 111, 7)


def case_param(batch, vocab, k, onehot):
    marks = [] if in_default_run(batch, vocab, k) else [pytest.mark.slow]
    return pytest.param(batch, vocab, k, onehot, marks=marks, id=f"B{batch}-V{vocab}-K{k}-{'onehot' if onehot else 'random'}")


@pytest.mark.parametrize("batch_size, vocab_size, num_speculate_tokens, onehot_target", [case_param(*c) for c in CASES])
def test_chain_speculative_sampling(device, batch_size, vocab_size, num_speculate_tokens, onehot_target):
    size = batch_size * (num_speculate_tokens + 1) * vocab_size
    if device.type == "cpu" and size > CPU_LIMIT:
        pytest.skip(f"{size:.2e} probabilities per tensor (~{5 * 4 * size / 2**30:.0f} GB for the call) do not fit the CPU's share")
    g = torch.Generator().manual_seed(batch_size * 7 + vocab_size + num_speculate_tokens)
    draft = torch.rand(batch_size, num_speculate_tokens, vocab_size, generator=g)
    draft /= draft.sum(dim=-1, keepdim=True)
    draft_token_ids = torch.randint(vocab_size, (batch_size, num_speculate_tokens), generator=g, dtype=torch.int32)
    if not onehot_target:
        target = torch.rand(batch_size, num_speculate_tokens + 1, vocab_size, generator=g)
        target /= target.sum(dim=-1, keepdim=True)
    else:
        target_token_ids = torch.randint(vocab_size, (batch_size, num_speculate_tokens + 1), generator=g, dtype=torch.int32)
        target_token_ids[:, :num_speculate_tokens] = draft_token_ids
        target = torch.zeros(batch_size, num_speculate_tokens + 1, vocab_size)
        target.scatter_(2, target_token_ids.long().unsqueeze(-1), 1.0)
    draft, draft_token_ids, target = draft.to(device), draft_token_ids.to(device), target.to(device)

    accepted_total = torch.zeros(batch_size, dtype=torch.int32, device=device)
    emitted_total = torch.zeros(batch_size, dtype=torch.int32, device=device)
    expected_emitted = torch.zeros(batch_size, dtype=torch.int64)
    trials = 3 if device.type == "cpu" and size > CPU_FEW_TRIALS else 10
    for trial in range(trials):
        output_token_ids, accepted, emitted = chain_speculative_sampling(
            draft, draft_token_ids, target, accepted_total, emitted_total, seed=trial, offset=0)
        assert accepted is accepted_total and emitted is emitted_total
        assert output_token_ids.dtype == torch.int32 and output_token_ids.shape == (batch_size, num_speculate_tokens + 1)
        out = output_token_ids.cpu()
        if onehot_target:
            assert torch.equal(out, target_token_ids)
        else:
            assert bool((out[out >= 0] < vocab_size).all())
            mismatches = out[:, :-1] != draft_token_ids.cpu()
            first = torch.where(mismatches.any(dim=1), mismatches.int().argmax(dim=1), num_speculate_tokens)
            position = torch.arange(num_speculate_tokens + 1)
            # Contiguous mismatches: everything from the first one on differs from the drafts,
            # the first is a token and -1 follows it.
            assert bool((mismatches | (position[None, :-1] < first[:, None])).all())
            assert bool((out[position[None, :] > first[:, None]] == -1).all())
            assert bool((out.gather(1, first[:, None]) >= 0).all())
        expected_emitted += (out != -1).sum(dim=1) - 1
        assert torch.equal(emitted_total.cpu().long(), expected_emitted)
    assert bool((accepted_total >= emitted_total).all()) and bool((accepted_total <= trials * num_speculate_tokens).all())
    if onehot_target:
        assert bool((accepted_total == trials * num_speculate_tokens).all())


def docstring_example(device):
    draft_probs = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.2, 0.3, 0.4, 0.1]]], device=device)
    draft_token_ids = torch.tensor([[2, 1]], dtype=torch.int32, device=device)
    target_probs = torch.tensor([[[0.0, 0.1, 0.6, 0.3], [1.0, 0.0, 0.0, 0.0], [0.7, 0.1, 0.1, 0.1]]], device=device)
    return draft_probs, draft_token_ids, target_probs


def test_flashinfer_docstring_example(device):
    """Token 2 (target 0.6 >= draft 0.3) is always accepted, token 1 (target 0) always rejected,
    and the residual relu(target - draft) at position 1 is all on token 0: [2, 0, -1] for every
    draw, accepted 1 (position 1's own coin rejects), emitted 1."""
    args = docstring_example(device)
    for kwargs in [{}, dict(seed=0, offset=0), dict(seed=2**64 - 1, offset=12345),
                   dict(generator=torch.Generator(device).manual_seed(5))]:
        output_token_ids, accepted, emitted = chain_speculative_sampling(*args, **kwargs)
        assert output_token_ids.tolist() == [[2, 0, -1]]
        assert accepted.tolist() == [1] and emitted.tolist() == [1]
        assert output_token_ids.dtype == accepted.dtype == emitted.dtype == torch.int32
