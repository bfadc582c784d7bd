"""The first-command demo (``python -m sss_ext.models.demo``) and its settings rule, on tiny models.

The demo's statistics (bootstrap intervals, paired differences), the selection rule of
``scripts/choose_demo_settings.py`` and the sentence computed from the table are checked here
without SmolLM2; the recorded manifest section must agree with the rule applied to its own
recorded numbers.
"""

from __future__ import annotations

import pytest
import torch

from sss_ext.models import compare, demo
from sss_ext.models.compare import MethodRun, bootstrap_mean_ci, choose_settings, describe, paired_difference_ci
from decoding_helpers import trio, word_tokenizer


def _candidate(shift, k, proxy, passes):
    return {"shift": shift, "num_draft_tokens": k, "proxy_mean": proxy, "target_passes": passes}


def test_choose_settings_rule():
    bon = {"proxy_mean": 0.6, "target_passes": 68.0}
    candidates = [_candidate(1.0, 2, 0.45, 10.7), _candidate(2.0, 4, 0.70, 10.0), _candidate(2.0, 2, 0.66, 10.9),
                  _candidate(3.0, 2, 0.80, 11.0), _candidate(1.5, 2, 0.65, 18.0)]  # the last one: over the pass budget
    chosen, met = choose_settings(candidates, bon, 0.25)
    assert met and (chosen["shift"], chosen["num_draft_tokens"]) == (2.0, 2)
    # none reaches Best-of-N's proxy: the best proxy within the budget, rule not met
    chosen, met = choose_settings(candidates[:1] + candidates[4:], bon, 0.25)
    assert not met and chosen["shift"] == 1.0
    # a tighter budget excludes the 18-pass candidate even though its proxy would qualify
    chosen, met = choose_settings([_candidate(1.5, 2, 0.65, 18.0)], bon, 0.25)
    assert not met
    with pytest.raises(ValueError, match="candidates must not be empty"):
        choose_settings([], bon, 0.25)
    with pytest.raises(ValueError, match="pass_fraction must be in"):
        choose_settings(candidates, bon, 0.0)


def test_bootstrap_interval_covers_the_mean_at_its_level():
    generator = torch.Generator().manual_seed(0)
    trials, size = 200, 32
    samples = torch.randn(trials, size, generator=generator, dtype=torch.float64) * 0.2 + 0.7

    def coverage(level):
        hits = 0
        for row in samples:
            _, low, high = bootstrap_mean_ci(row, level=level, num_resamples=1000, seed=1)
            hits += low <= 0.7 <= high
        return hits / trials

    assert 0.88 <= coverage(0.95) <= 0.99
    assert coverage(0.5) < 0.65  # negative control: a narrower interval visibly under-covers
    mean, low, high = bootstrap_mean_ci([0.2, 0.4, 0.9])
    assert low <= mean <= high and mean == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least 2 scores"):
        bootstrap_mean_ci([0.3])
    with pytest.raises(ValueError, match="level must be in"):
        bootstrap_mean_ci([0.3, 0.4], level=1.0)
    with pytest.raises(ValueError, match="the same prompts"):
        paired_difference_ci([0.1, 0.2], [0.1, 0.2, 0.3])


def _run(label, method, passes, wall):
    return MethodRun(label=label, method=method, config=None, texts=[], target_passes=passes, wall_seconds=wall)


@pytest.mark.parametrize("sss_shift,verb", [(0.15, "above"), (-0.15, "below"), (0.0, "level with")])
def test_describe_is_computed_from_the_numbers(sss_shift, verb):
    generator = torch.Generator().manual_seed(3)
    base = torch.rand(40, generator=generator, dtype=torch.float64) * 0.5 + 0.25
    noise = torch.randn(40, generator=generator, dtype=torch.float64) * 0.01
    runs = (_run("SSS lambda=2 K=2", "sss", 11.0, 30.0), _run("Best-of-4", "bon", 68.0, 20.0), _run("vanilla", "vanilla", 17.0, 6.0))
    gold = {"SSS lambda=2 K=2": base + sss_shift + noise, "Best-of-4": base, "vanilla": base - 0.1}
    sentence = describe(*runs, gold)
    assert sentence.startswith(f"SSS lambda=2 K=2 scores {verb} Best-of-4 on mean gold reward")
    assert "6.2x fewer target passes per prompt" in sentence and "1.5x more wall time" in sentence
    assert f"{float(gold['Best-of-4'].mean()):.3f}" in sentence
    expected = "above" if sss_shift + 0.1 > 0 else "below"
    assert f"and {expected} vanilla sampling" in sentence


def test_demo_settings_read_from_the_manifest():
    with pytest.raises(ValueError, match="run scripts/choose_demo_settings.py"):
        demo.demo_settings({})
    settings = {"shift": 2.0, "num_draft_tokens": 2, "num_samples": 4, "max_new_tokens": 16, "temperature": 0.7}
    assert demo.demo_settings({"demo": {"settings": dict(settings, extra=1)}}) == settings


def test_shipped_demo_section_follows_its_rule():
    from sss_ext.models.manifest import read_manifest

    section = read_manifest().get("demo")
    if section is None:
        pytest.skip("no demo section recorded")
    settings = demo.demo_settings({"demo": section})
    chosen, met = choose_settings(section["candidates"], section["best_of_n"], section["args"]["pass_fraction"])
    assert (chosen["shift"], chosen["num_draft_tokens"]) == (settings["shift"], settings["num_draft_tokens"])
    assert met == section["rule_met"]
    assert section["prompts"].startswith("train.jsonl[")  # never the evaluation prompts
    assert section["rule"] == compare.SELECTION_RULE.format(pass_fraction=section["args"]["pass_fraction"],
                                                            num_samples=settings["num_samples"])


def test_demo_runs_end_to_end_on_tiny_models(monkeypatch, capsys):
    from sss_ext import models as default_models

    tokenizer = word_tokenizer(12)
    target, draft, ref = trio(12)

    def score(texts):
        return torch.tensor([t.count("w3") / (1 + len(t.split())) for t in texts])

    def load_default(**kwargs):
        return default_models.DefaultModels(target=target, draft=draft, ref_draft=ref, tokenizer=tokenizer,
                                            gold_reward=score, proxy_reward=score,
                                            manifest={"demo": {"prompts": "train.jsonl[0:2]"}})

    settings = {"shift": 2.0, "num_draft_tokens": 3, "num_samples": 3, "max_new_tokens": 5, "temperature": 1.0}
    monkeypatch.setattr(default_models, "load_default", load_default)
    monkeypatch.setattr(default_models, "load_prompts", lambda split, limit: [f"w{2 + i % 9} w4" for i in range(limit)])
    monkeypatch.setattr(demo, "demo_settings", lambda manifest: settings)
    assert demo.main(["--prompts", "6", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    for label in ("vanilla", "Best-of-3", "SSS lambda=2 K=3"):
        assert f"\n{label}" in out and f"  {label}: " in out
    assert "Best-of-3 " in out and "target passes/prompt" in out
    assert "SSS lambda=2 K=3 scores " in out  # the computed sentence
    assert "6 held-out prompts, 5 new tokens" in out
    # Best-of-3 runs three rows per prompt: three times vanilla's target passes
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines() if line.startswith(("vanilla ", "Best-of-3 "))}
    passes = {label: float(line.split()[-3]) for label, line in rows.items()}
    assert passes["Best-of-3"] == pytest.approx(3 * passes["vanilla"])


def test_demo_argument_errors():
    with pytest.raises(SystemExit, match="--prompts must be in"):
        demo.main(["--prompts", "1"])
    with pytest.raises(SystemExit, match="--threads must be >= 1"):
        demo.main(["--threads", "0"])


def test_ratios_that_round_to_one_read_as_about_the_same():
    from sss_ext.models.compare import _times

    assert _times(10.0, 10.4, "wall time") == "about the same wall time"
    assert _times(10.4, 10.0, "wall time") == "about the same wall time"
    assert _times(10.0, 10.0, "target passes") == "about as many target passes"
    assert _times(10.0, 12.0, "wall time") == "1.2x less wall time"
    assert _times(12.0, 10.0, "wall time") == "1.2x more wall time"
    assert _times(11.0, 68.0, "target passes") == "6.2x fewer target passes"
