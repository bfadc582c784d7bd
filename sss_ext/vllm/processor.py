"""``SSSLogitsProcessor``: vLLM samples the tilted target ``p* ∝ q·(r/d)^λ`` (docs/algorithm.md §1, §2).

vLLM applies custom logits processors to the target's raw logits ``zq`` **before** penalties,
temperature, min-p, top-k and top-p (vLLM's ``Sampler``). This processor adds
``λ·(zr − zd)`` to the row of every request with ``λ = extra_args["sss_shift"] != 0``, where
``zr``, ``zd`` are the logits of the aligned draft ``r`` and the reference draft ``d`` on the
same prefix (prompt + output so far). vLLM then divides by ``τ`` and truncates, so it samples

    p* = warp(softmax(zq/τ + λ·(zr/τ − zd/τ)))

with top-k / top-p / min-p applied to ``p*``, never to ``q``, ``r`` or ``d`` apart (§2).
Rows with ``λ = 0`` or without ``sss_shift`` are never touched: plain vLLM, bit for bit.

Configuration (engine start)::

    LLM(model=TARGET, logits_processors=[SSSLogitsProcessor],   # or the entry point, see below
        additional_config={"sss": {"draft": R_DIR, "ref_draft": D_DIR}})

``additional_config["sss"]`` keys: ``draft`` and ``ref_draft`` (transformers checkpoints sharing
the target's vocabulary and tokenizer), optional ``dtype`` of the drafts (``"float32"``,
default, or ``"bfloat16"``/``"float16"``). The entry point
``vllm.logits_processors: sss = sss_ext.vllm:SSSLogitsProcessor`` loads it into every engine
of an environment where sss_ext is installed; without ``additional_config["sss"]`` it stays
inactive (plain vLLM). Loaded both ways, the second instance of an engine stays inactive.

Per request: ``SamplingParams(extra_args={"sss_shift": λ})`` with ``0 <= λ <= MAX_SHIFT``
(16), checked by vLLM's front end before the request reaches the engine.
"""

from __future__ import annotations

import math
import weakref
from pathlib import Path

import torch

from .drafts import DraftBatch, Tracked

try:  # vLLM is optional for the rest of sss_ext
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
except ImportError:  # pragma: no cover - exercised only without vLLM
    LogitsProcessor = object
    BatchUpdate = MoveDirectionality = None

CONFIG_KEY = "sss"
SHIFT_KEY = "sss_shift"
REQUEST_KEYS = (SHIFT_KEY,)
CONFIG_KEYS = ("draft", "ref_draft", "dtype")
MAX_SHIFT = 16.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def request_shift(params) -> float:
    """``λ`` of a request (0 without ``extra_args["sss_shift"]``); ``ValueError`` naming what is wrong."""
    extra = getattr(params, "extra_args", None) or {}
    unknown = sorted(k for k in extra if isinstance(k, str) and k.startswith("sss") and k not in REQUEST_KEYS)
    if unknown:
        raise ValueError(f"sss_ext.vllm: unknown SamplingParams.extra_args key(s) {unknown}; known: {list(REQUEST_KEYS)}")
    if SHIFT_KEY not in extra:
        return 0.0
    value = extra[SHIFT_KEY]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"sss_ext.vllm: extra_args['{SHIFT_KEY}'] must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or value > MAX_SHIFT:
        raise ValueError(f"sss_ext.vllm: extra_args['{SHIFT_KEY}'] = {value!r} is out of range: "
                         f"need 0 <= {SHIFT_KEY} <= {MAX_SHIFT:g}")
    if value == 0.0:
        return 0.0
    refuse_options(params)
    return value


def refuse_options(params) -> None:
    """``ValueError`` for sampling options under which vLLM's sample would not be ``p*`` exactly."""
    rep = getattr(params, "repetition_penalty", 1.0)
    if rep is not None and rep != 1.0:
        raise ValueError(
            f"sss_ext.vllm: repetition_penalty={rep} with {SHIFT_KEY} != 0 is refused: vLLM applies it to the "
            "tilted logits zq + λ(zr − zd), not to q, r and d apart (docs/algorithm.md §1, Logits processors), "
            "so the sample would not follow p*; use presence/frequency penalties (additive: exact) or repetition_penalty=1")
    if getattr(params, "prompt_embeds", None) is not None:  # pragma: no cover - not a SamplingParams field today
        raise ValueError("sss_ext.vllm: prompt embeddings are refused: the drafts need token ids")


def parse_config(vllm_config) -> dict | None:
    """``additional_config["sss"]`` checked; None when absent (the processor stays inactive)."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    if CONFIG_KEY not in extra:
        return None
    cfg = extra[CONFIG_KEY]
    if not isinstance(cfg, dict):
        raise ValueError(f"sss_ext.vllm: additional_config['{CONFIG_KEY}'] must be a dict, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"sss_ext.vllm: unknown additional_config['{CONFIG_KEY}'] key(s) {unknown}; known: {list(CONFIG_KEYS)}")
    for key in ("draft", "ref_draft"):
        if not cfg.get(key):
            raise ValueError(f"sss_ext.vllm: additional_config['{CONFIG_KEY}']['{key}'] (a transformers checkpoint folder) is required")
        if not Path(cfg[key]).is_dir():
            raise ValueError(f"sss_ext.vllm: additional_config['{CONFIG_KEY}']['{key}'] = {cfg[key]!r} is not a folder")
    dtype = cfg.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"sss_ext.vllm: additional_config['{CONFIG_KEY}']['dtype'] must be one of {list(DTYPES)}, got {dtype!r}")
    return {"draft": str(cfg["draft"]), "ref_draft": str(cfg["ref_draft"]), "dtype": dtype}


def _tokenizer_vocab(path):
    """The tokenizer's token -> id map at ``path``, or None when the folder has no tokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path)).get_vocab()
    except Exception:  # noqa: BLE001 - no tokenizer files: nothing to compare
        return None


def load_drafts(cfg: dict, vocab_size: int, target_tokenizer: str | None):
    """The two drafts, checked against the target's vocabulary size and tokenizer."""
    from transformers import AutoModelForCausalLM

    models = []
    target_vocab = _tokenizer_vocab(target_tokenizer) if target_tokenizer else None
    for key, label in (("draft", "aligned draft r"), ("ref_draft", "reference draft d")):
        path = cfg[key]
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg["dtype"]])
        except Exception as exc:
            raise ValueError(f"sss_ext.vllm: additional_config['sss']['{key}'] = {path!r} ({label}) "
                             f"does not load as a transformers causal LM: {exc}") from exc
        head = model.get_output_embeddings().weight.shape[0]
        if head != vocab_size:
            raise ValueError(f"sss_ext.vllm: additional_config['sss']['{key}'] = {path!r} ({label}) has "
                             f"{head} output logits, the target has {vocab_size}: the drafts must share the target's vocabulary")
        if target_vocab is not None:
            vocab = _tokenizer_vocab(path)
            if vocab is not None and vocab != target_vocab:
                raise ValueError(f"sss_ext.vllm: additional_config['sss']['{key}'] = {path!r} ({label}) has a tokenizer "
                                 "whose vocabulary differs from the target's: the drafts must share the target's tokenizer")
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        models.append(model)
    return models


_CLAIMS: "weakref.WeakValueDictionary[int, SSSLogitsProcessor]" = weakref.WeakValueDictionary()


def _claim(processor, vllm_config) -> bool:
    """True for the first processor of an engine (the entry point and ``logits_processors=``
    both load the class into the same engine: only one may add the tilt)."""
    owner = _CLAIMS.get(id(vllm_config))
    if owner is not None and owner._vllm_config is vllm_config:
        return False
    _CLAIMS[id(vllm_config)] = processor
    return True


class SSSLogitsProcessor(LogitsProcessor):
    """vLLM v1 logits processor adding ``λ·(zr − zd)`` to the rows of requests with ``sss_shift != 0``."""

    def __init__(self, vllm_config, device, is_pin_memory: bool):
        self.cfg = parse_config(vllm_config)
        self.device = torch.device("cpu")  # the drafts run on the CPU next to vLLM's CPU runner
        self.rows: dict[int, Tracked] = {}
        self.batch = None
        self._vllm_config = vllm_config
        self.duplicate = self.cfg is not None and not _claim(self, vllm_config)
        if self.cfg is None or self.duplicate:
            return  # inactive: no configuration, or another instance of this engine adds the tilt
        model_config = vllm_config.model_config
        vocab_size = model_config.get_vocab_size()
        tokenizer = None if getattr(model_config, "skip_tokenizer_init", False) else model_config.tokenizer
        draft, ref = load_drafts(self.cfg, vocab_size, tokenizer)
        self.batch = DraftBatch(draft, ref, self.device)

    @classmethod
    def validate_params(cls, params) -> None:
        """Request-time check (vLLM calls it before the request reaches the engine)."""
        request_shift(params)

    def is_argmax_invariant(self) -> bool:
        return False  # the tilt moves the argmax: greedy requests need it too

    def update_state(self, batch_update) -> None:
        if batch_update is None or self.duplicate:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, prompt, output in batch_update.added:
            self.rows.pop(index, None)
            shift = request_shift(params) if params is not None else 0.0
            if shift == 0.0:
                continue
            if self.batch is None:
                raise ValueError(f"sss_ext.vllm: a request sets extra_args['{SHIFT_KEY}'] but the engine was started "
                                 "without additional_config={'sss': {'draft': ..., 'ref_draft': ...}}")
            if prompt is None:
                raise ValueError("sss_ext.vllm: the drafts need the prompt's token ids (prompt embeddings are refused)")
            self.rows[index] = Tracked(shift=shift, prompt=list(prompt), output=output)
        for a, b, direction in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if direction == MoveDirectionality.SWAP:
                if ra is not None:
                    self.rows[b] = ra
                if rb is not None:
                    self.rows[a] = rb
            else:
                if ra is not None:
                    self.rows[b] = ra
        if self.batch is not None:
            live = {id(t) for t in self.rows.values()}
            self.batch.drop([m for m in self.batch.members if id(m) not in live])

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        items = sorted(self.rows.items())
        tilts = self.batch.tilts([t for _, t in items])
        rows = torch.tensor([i for i, _ in items], dtype=torch.int64)
        shifts = torch.tensor([t.shift for _, t in items], dtype=torch.float32)
        delta = (shifts[:, None] * tilts).to(device=logits.device, dtype=logits.dtype)
        logits[rows.to(logits.device)] += delta
        return logits
