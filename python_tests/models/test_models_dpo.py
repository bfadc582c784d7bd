"""DPO loss (sss_ext.models.dpo) and the shipped aligned draft vs the reference draft."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sss_ext.models.dpo import dpo_loss, sequence_logps


def test_dpo_loss_values_and_gradient():
    pc, pr = torch.tensor([-3.0, -2.0], requires_grad=True), torch.tensor([-4.0, -1.0], requires_grad=True)
    rc, rr = torch.tensor([-3.5, -2.0]), torch.tensor([-3.5, -2.0])
    loss, margin = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # margins: (0.5) - (-0.5) = 1 ; (0) - (1) = -1
    assert torch.allclose(margin, torch.tensor([1.0, -1.0]))
    expected = -(math.log(1 / (1 + math.exp(-0.5))) + math.log(1 / (1 + math.exp(0.5)))) / 2
    assert abs(float(loss.detach()) - expected) < 1e-6
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises chosen, lowers rejected
    # policy == reference: loss is log 2 whatever the sequences
    z = torch.randn(5)
    assert abs(float(dpo_loss(z, z + 1, z, z + 1)[0]) - math.log(2)) < 1e-6


@pytest.mark.slow
def test_dpo_training_moves_preference_on_toy_model():
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    ref = LlamaForCausalLM(cfg).eval()
    policy = LlamaForCausalLM(cfg)
    policy.load_state_dict(ref.state_dict())
    chosen = torch.tensor([[1, 2, 3, 4, 5]])
    rejected = torch.tensor([[1, 2, 9, 9, 9]])
    mask = torch.ones_like(chosen)
    with torch.no_grad():
        rc, rr = sequence_logps(ref, chosen, mask, 3), sequence_logps(ref, rejected, mask, 3)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in range(30):
        loss, _ = dpo_loss(sequence_logps(policy, chosen, mask, 3), sequence_logps(policy, rejected, mask, 3), rc, rr, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        margin = (sequence_logps(policy, chosen, mask, 3) - rc) - (sequence_logps(policy, rejected, mask, 3) - rr)
    assert float(margin) > 1.0 and float(loss.detach()) < math.log(2) - 0.2


@pytest.mark.models
@pytest.mark.slow
def test_aligned_draft_beats_reference_on_proxy_reward():
    """Held-out training prompts (never paired), same seed for both drafts."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    import sss_ext
    from sss_ext.models import load_default
    from sss_ext.models.paths import PROMPTS_DIR

    m = load_default(gold=False)
    rows = [json.loads(line)["prompt"] for line in open(PROMPTS_DIR / "train.jsonl")]
    held_out, copies = rows[-48:], 4  # the DPO script's held-out tail, 4 samples of each prompt
    prompts = held_out * copies
    cfg = sss_ext.SamplingConfig(max_new_tokens=16, temperature=1.0, seed=123, ignore_eos=True)
    scores = {}
    for name, model in (("d", m.ref_draft), ("r", m.draft)):
        out = sss_ext.generate(None, model, prompts, tokenizer=m.tokenizer, method="draft", config=cfg)
        scores[name] = m.proxy_reward([p + t for p, t in zip(prompts, out.texts)])
    gain = (scores["r"] - scores["d"]).view(copies, len(held_out)).mean(0)  # (48,) per-prompt mean gain
    se = float(gain.std() / math.sqrt(len(gain)))
    assert float(gain.mean()) > 2 * se, (float(gain.mean()), se)
