"""Block verification accepts more drafts than token verification on real logits.

The rounds of an SSS run on the default models (SmolLM2-135M target, the shipped drafts;
128 evaluation prompts, 24 tokens, K = 4; an observer scores each round as it happens) are
scored under both rules: given a
round's drafts, the expected number of accepted drafts over the uniforms is exact for each rule,

* token by token: ``sum_k prod_{i<k} min(1, P_i(x_i) / Q_i(x_i))``;
* block: ``E[tau] = sum_t t h_t prod_{i>t} (1 - h_i)`` with ``p_i``, ``R_i`` and ``h_i`` of
  docs/algorithm.md §12 (``h_n = p_n``),

so the comparison has no uniform noise (the common random inputs integrated out). The drafts
are the run's own, drawn from ``warp(r)``; the guarantee holds in expectation over them, so the
mean of block - token over the row-rounds must be positive with 95% confidence (for one fixed
draft sequence block may accept fewer). The exact expectations are checked against the op's
empirical means on one row.
"""

import math

import pytest
import torch

import sss_ext
from sss_ext.decoding.observe import Observer

pytestmark = [pytest.mark.models, pytest.mark.slow]

TEMPERATURE, SHIFT, K = 0.7, 2.0, 4


def expected_accepted(target_logits, draft_logits, ref_logits, drafts, num_draft):
    """Exact expected accepted drafts of each row under token and block verification.

    Shape
    -----
    logits: (B, K+1, V); drafts: (B, K); num_draft: (B,) -> token (B,), block (B,) float64
    """
    zq, zr, zd = (z.double() for z in (target_logits, draft_logits, ref_logits))
    p_star = sss_ext.warp_probs(zq + SHIFT * (zr - zd), TEMPERATURE)  # (B, K+1, V)
    r_tilde = sss_ext.warp_probs(zr, TEMPERATURE)
    ratio = (p_star[:, :-1].gather(-1, drafts[..., None]) / r_tilde[:, :-1].gather(-1, drafts[..., None])).squeeze(-1)
    token = torch.zeros(drafts.shape[0], dtype=torch.float64)
    block = torch.zeros_like(token)
    for b in range(drafts.shape[0]):
        n = int(num_draft[b])
        alive, weight, h = 1.0, 1.0, [1.0]  # h_0 = 1: tau >= 0
        for i in range(1, n + 1):
            alive *= min(1.0, float(ratio[b, i - 1]))
            token[b] += alive
            weight = min(1.0, weight * float(ratio[b, i - 1]))  # p_i
            if i < n:
                mass = float((weight * p_star[b, i] - r_tilde[b, i]).clamp(min=0).sum())  # R_i
                h.append(mass / (mass + 1.0 - weight) if mass + 1.0 - weight > 0 else 0.0)
            else:
                h.append(weight)
        for t in range(1, n + 1):
            block[b] += t * h[t] * math.prod(1.0 - h[i] for i in range(t + 1, n + 1))
    return token, block


class ExpectedAccepted(Observer):
    """Scores every speculative round as it happens (no logits kept, but the first round's)."""

    def __init__(self):
        self.token, self.block, self.first = [], [], None

    def on_round(self, record):
        if record.kind != "round":
            return
        drafts, logits = record.draft_tokens, record.logits
        num_draft = record.num_draft_tokens
        if num_draft is None:
            num_draft = torch.full((drafts.shape[0],), drafts.shape[1])
        token, block = expected_accepted(logits["target"], logits["draft"], logits["ref"], drafts, num_draft)
        self.token.append(token)
        self.block.append(block)
        if self.first is None:
            self.first = (drafts[:1].clone(), {role: z[:1].clone() for role, z in logits.items()}, token[0], block[0])


def test_block_accepts_more_on_the_default_models():
    from sss_ext.models import load_default, load_prompts

    models = load_default(rewards=False)
    prompts = load_prompts("eval", 128)
    config = sss_ext.SamplingConfig(max_new_tokens=24, num_draft_tokens=K, temperature=TEMPERATURE, shift=SHIFT, seed=0,
                                    ignore_eos=True)
    observer = ExpectedAccepted()
    sss_ext.generate(models.target, models.draft, prompts, ref_model=models.ref_draft, tokenizer=models.tokenizer,
                     method="sss", config=config, observer=observer)
    token, block = torch.cat(observer.token), torch.cat(observer.block)

    # The exact expectations are what the op does: the empirical mean of the first row agrees.
    drafts, logits, *exact = observer.first
    chunk, chunks = 200, 10  # 2000 draws, 200 rows of (K+1, V) logits per call
    rows = [logits[role].expand(chunk, -1, -1) for role in ("target", "draft", "ref")]
    generator = torch.Generator().manual_seed(1)
    for rule, expected in zip(("token", "block"), exact):
        accepted = torch.cat([
            sss_ext.verify(rows[0], rows[1], drafts.expand(chunk, -1), rows[2], temperature=TEMPERATURE, shift=SHIFT,
                           uniforms=sss_ext.draw_uniforms((chunk, drafts.shape[1] + 1), "cpu", generator),
                           verification=rule).num_accepted.double()
            for _ in range(chunks)])
        assert abs(float(accepted.mean()) - float(expected)) <= 5 * float(accepted.std()) / math.sqrt(accepted.numel()) + 1e-9, \
            (rule, float(accepted.mean()), float(expected))

    difference = block - token
    mean, error = float(difference.mean()), float(difference.std() / math.sqrt(difference.numel()))
    print(f"\n{difference.numel()} row-rounds: expected accepted drafts token {float(token.mean()):.3f}, "
          f"block {float(block.mean()):.3f}, block - token {mean:+.4f} ± {1.96 * error:.4f} (95%); "
          f"rows with block below token: {int((difference < -1e-12).sum())}")
    assert mean - 1.96 * error > 0
