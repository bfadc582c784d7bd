"""What every method runner receives (:class:`RunContext`) and returns (:class:`MethodResult`).

:func:`sss_ext.generate` checks its arguments, builds one ``RunContext`` and hands it to the
runner of the chosen method (:mod:`sss_ext.decoding.methods`); the runners pass it on to
the samplers (:class:`~sss_ext.decoding.speculative.SpeculativeRun`,
:class:`~sss_ext.decoding.autoregressive.AutoregressiveRun`) instead of long positional lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import SamplingConfig
from .hooks import GenerationHooks
from .monitor import CallMonitor
from .randomness import Randomness
from .stats import StatsRecorder


@dataclass
class ModelSet:
    """The checked models of one call and what they share (built by :func:`~sss_ext.decoding.validate.resolve_models`).

    A model the method does not run is None here, even when it was passed.
    """

    target: object | None
    draft: object | None
    ref: object | None
    tokenizer: object | None
    vocab_size: int
    device: torch.device
    context_length: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int

    def get(self, role: str):
        """The model of ``role`` ("target", "draft" or "ref")."""
        return {"target": self.target, "draft": self.draft, "ref": self.ref}[role]


@dataclass
class RunContext:
    """Everything one :func:`sss_ext.generate` call shares between its method and samplers.

    Attributes
    ----------
    method : str
        The method's name (a key of :data:`sss_ext.decoding.methods.METHODS`).
    models : ModelSet
        The checked models, vocabulary size, device, EOS and pad ids.
    prompts : list of torch.Tensor
        One 1-D int64 CPU tensor per prompt.
    config : SamplingConfig
    randomness : Randomness
        The per-row random streams of the call, keyed by ``config.seed`` and the global
        prompt indices (:mod:`sss_ext.decoding.randomness`).
    stats : StatsRecorder
        Forward, reward and round counters.
    monitor : CallMonitor
        What the sampler runs report to (:mod:`sss_ext.decoding.monitor`): the stats and,
        with an observer, its per-round records.
    scorer : RewardScorer or None
        The reward of the reward-guided methods (None for the others).
    hooks : GenerationHooks or None
        Logits processor, stopping criteria and streamer (:mod:`sss_ext.decoding.hooks`); None without any.
    """

    method: str
    models: ModelSet
    prompts: list[torch.Tensor]
    config: SamplingConfig
    randomness: Randomness
    stats: StatsRecorder
    monitor: CallMonitor
    scorer: object | None = None
    hooks: GenerationHooks | None = None

    @property
    def device(self) -> torch.device:
        return self.models.device


@dataclass
class MethodResult:
    """Per-prompt output of a method runner.

    Attributes
    ----------
    sequences : list of torch.Tensor
        Generated ids of every prompt (prompt excluded).
    log_z : list of float or None
        sss / sss-paper / sss-sir (the chosen candidate): ``sum_t log Z_t`` over the emitted tokens of every prompt.
    extras : list of dict
        Method details per prompt (candidates, rewards, decisions ...); ``{}`` when none.
    """

    sequences: list[torch.Tensor]
    log_z: list[float] | None = None
    extras: list[dict] = field(default_factory=list)
