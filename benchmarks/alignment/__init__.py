"""Parts of ``benchmarks/bench_alignment.py``, one job each.

* :mod:`.grid` — which methods and settings run (labels, methods, config overrides);
* :mod:`.instruments` — the observer that counts target row-forwards and records log Z;
* :mod:`.measure` — run one method over the prompts, summarise it into one table row;
* :mod:`.statistics` — bootstrap intervals, sequence log-likelihoods, the Pareto front;
* :mod:`.report` — row order, the markdown table, the JSON / CSV / markdown files;
* :mod:`.plots` — gold reward against cost;
* :mod:`.session` — the whole run (resume, settings, metadata) and ``--report-only``.
"""
