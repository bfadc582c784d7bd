"""The decoding layer: drive target / aligned draft / reference draft models with the ``sss_ext`` op.

``generate`` (:mod:`.api`) runs SSS, standard speculative sampling and the baselines of
docs/algorithm.md §9 behind one interface; :mod:`.methods` is the one table of methods
(runner, models used, reward needed); ``SamplingConfig`` (:mod:`.config`) holds the settings;
:mod:`.validate` checks the arguments; :mod:`.observe` defines the per-round records an
``observer`` receives; :mod:`.cache` keeps the three KV caches and rolls them back per row.
The HuggingFace front end (``custom_generate``) is :mod:`sss_ext.hf`, one level up.
"""

from .api import GenerateOutput, generate
from .config import SamplingConfig
from .context import MethodResult, RunContext
from .methods import METHODS, Method, get_method, register
from .observe import ForwardCount, Observer, RecordingObserver, RoundRecord
from .stats import GenerationStats, StatsReport

__all__ = ["generate", "SamplingConfig", "GenerateOutput", "GenerationStats", "StatsReport", "METHODS", "Method",
           "get_method", "register", "RunContext", "MethodResult", "Observer", "RecordingObserver", "RoundRecord",
           "ForwardCount"]
