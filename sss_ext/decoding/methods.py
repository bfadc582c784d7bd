"""The one table of decoding methods behind :func:`sss_ext.generate`.

Each :class:`Method` names its runner (``run(ctx: RunContext) -> MethodResult``), the model
arguments it runs and whether it needs the reference draft or a reward. ``generate``, the
argument checks and the command line read everything from :data:`METHODS`; adding a method
is one :func:`register` call (or one entry below) with a runner.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from .autoregressive import run_autoregressive
from .baselines import best_of_n, soft_best_of_n, speculative_rejection
from .context import MethodResult, RunContext
from .roles import MODEL_ARGUMENTS
from .sir import sss_sir
from .speculative import run_speculative
from .tree_run import run_tree

__all__ = ["Method", "METHODS", "METHOD_NAMES", "register", "get_method", "RunContext", "MethodResult"]



@dataclass(frozen=True)
class Method:
    """One decoding method.

    Attributes
    ----------
    name : str
        The ``method=`` value of :func:`sss_ext.generate` and ``--method`` of the CLI.
    run : callable(RunContext) -> MethodResult
        Generates for every prompt of the context.
    models : tuple of str
        The model arguments it runs, among ``"target"``, ``"draft"``, ``"ref_model"``;
        each must be given (the others are ignored, but must still share the vocabulary).
    needs_reward : bool
        Calls ``reward_fn`` (checked before generation; a :class:`~sss_ext.decoding.scoring.RewardScorer`
        is in ``ctx.scorer``).
    description : str
        One line for help texts.
    proposers : tuple of str
        The ``SamplingConfig.proposer`` values it takes (:data:`~sss_ext.decoding.config.PROPOSERS`);
        the default proposer ``"draft"`` is taken by every method.
    takes_trees : bool
        Runs ``SamplingConfig.draft_tree`` (tree drafts verified by ``sss_ext.verify_tree``).
    verifications : tuple of str
        The ``SamplingConfig.verification`` values it takes: ``"block"`` for the methods that
        verify chains of drafts against an exact target (not sss-paper's rule).
    """

    name: str
    run: Callable[[RunContext], MethodResult]
    models: tuple[str, ...]
    needs_reward: bool = False
    description: str = ""
    proposers: tuple[str, ...] = ("draft",)
    takes_trees: bool = False
    verifications: tuple[str, ...] = ("token",)

    def __post_init__(self):
        unknown = [m for m in self.models if m not in MODEL_ARGUMENTS]
        if unknown or not self.models:
            raise ValueError(f"Method {self.name!r}: models must be a non-empty subset of {MODEL_ARGUMENTS}, got {self.models}")

    @property
    def needs_ref(self) -> bool:
        """Runs the reference draft ``d`` (``ref_model``)."""
        return "ref_model" in self.models

    def check_config(self, config) -> None:
        """``ValueError`` naming the proposer when this method does not take ``config.proposer``."""
        if config.proposer not in self.proposers:
            takers = ", ".join(name for name, method in METHODS.items() if config.proposer in method.proposers)
            raise ValueError(f"method={self.name!r} does not take proposer={config.proposer!r} (methods that do: {takers})")
        if config.verification not in self.verifications:
            takers = ", ".join(name for name, method in METHODS.items() if config.verification in method.verifications)
            raise ValueError(f"method={self.name!r} does not take verification={config.verification!r} (methods that do: {takers})")
        if config.draft_tree is not None and not self.takes_trees:
            takers = ", ".join(name for name, method in METHODS.items() if method.takes_trees)
            raise ValueError(f"method={self.name!r} does not take draft_tree={config.draft_tree} (methods that do: {takers})")

    def models_for(self, config) -> tuple[str, ...]:
        """The model arguments the method runs under ``config``: without the draft when nothing needs ``r``
        (standard speculative sampling with the n-gram proposer)."""
        if config.proposer == "ngram" and not self.needs_ref:
            return tuple(name for name in self.models if name != "draft")
        return self.models


#: name -> Method, in the order help texts list them
METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (``ValueError`` if the name is taken)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def _chain_or_tree(ctx: RunContext, use_ref: bool) -> MethodResult:
    """sss (exact rule) and sd: a tree run under ``SamplingConfig.draft_tree``, else a chain run."""
    if ctx.config.draft_tree is not None:
        return run_tree(ctx, use_ref)
    return run_speculative(ctx, use_ref, "exact")


for _method in (
    Method("sss", partial(_chain_or_tree, use_ref=True), ("target", "draft", "ref_model"),
           description="reward-shifted speculative sampling, exact rule (tilted target q(r/d)^lambda)",
           proposers=("draft", "ngram"), takes_trees=True, verifications=("token", "block")),
    Method("sss-paper", partial(run_speculative, use_ref=True, mode="paper"), ("target", "draft", "ref_model"),
           description="reward-shifted speculative sampling, the published rule without the normaliser Z"),
    Method("sss-sir", sss_sir, ("target", "draft", "ref_model"),
           description="sampling-importance-resampling of num_candidates SSS samples by prod Z: the sequence-level tilt",
           verifications=("token", "block")),
    Method("sd", partial(_chain_or_tree, use_ref=False), ("target", "draft"),
           description="standard speculative sampling: the draft proposes, the target verifies",
           proposers=("draft", "ngram"), takes_trees=True, verifications=("token", "block")),
    Method("vanilla", partial(run_autoregressive, role="target"), ("target",), description="sampling from the target"),
    Method("draft", partial(run_autoregressive, role="draft"), ("draft",), description="sampling from the aligned draft alone"),
    Method("bon", best_of_n, ("target",), needs_reward=True, description="best-of-N target samples by reward"),
    Method("spec-rejection", speculative_rejection, ("target",), needs_reward=True,
           description="speculative rejection: best-of-N that drops low-reward partial responses"),
    Method("soft-bon", soft_best_of_n, ("target", "draft"), needs_reward=True,
           description="soft best-of-n over draft samples, reweighted by the target"),
):
    register(_method)
del _method


def method_names() -> tuple[str, ...]:
    """Every registered method name (registration order)."""
    return tuple(METHODS)


#: the names registered at import (what the CLI offers)
METHOD_NAMES = method_names()


def get_method(name) -> Method:
    """The registered method ``name``; ``ValueError`` listing the choices otherwise."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"method must be one of {method_names()}, got {name!r}")
    return METHODS[name]
