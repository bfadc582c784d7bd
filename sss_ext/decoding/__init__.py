"""The decoding layer: drive target / aligned draft / reference draft models with the ``sss_ext`` op.

``generate`` (:mod:`.api`) runs SSS, standard speculative sampling and the baselines of
ALGORITHM.md section 5 behind one interface; ``SamplingConfig`` (:mod:`.config`) holds the
settings; :mod:`.cache` keeps the three KV caches and rolls them back per row.
"""

from .api import GenerateOutput, generate
from .config import METHODS, SamplingConfig
from .stats import GenerationStats, StatsReport

__all__ = ["generate", "SamplingConfig", "GenerateOutput", "GenerationStats", "StatsReport", "METHODS"]

from .. import hf  # noqa: E402,F401  (makes ``sss_ext.hf.decode`` reachable after ``import sss_ext``)
