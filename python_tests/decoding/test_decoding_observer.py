"""``generate(..., observer=...)``: per-round records that account for every forward, the op's output and timings;
the method table (``sss_ext.decoding.methods``)."""

import time

import pytest
import torch

import sss_ext
from sss_ext import cli
from sss_ext.decoding import METHODS, Method, MethodResult, Observer, RecordingObserver, get_method, register
from decoding_helpers import one_thread, sum_reward, trio  # noqa: F401  (one_thread: autouse fixture)

PROMPTS = [[1, 2], [3], [4, 5, 6, 7]]


@pytest.fixture(scope="module")
def models():
    return trio(10)


def _generate(models, method, observer=None, **kwargs):
    q, r, d = models
    settings = dict(max_new_tokens=9, num_draft_tokens=3, eos_token_id=0, seed=4, num_samples=3, rejection_interval=2,
                    reward_fn=sum_reward(3))
    settings.update(kwargs)
    return sss_ext.generate(q, r, PROMPTS, ref_model=d, method=method, observer=observer, **settings)


@pytest.mark.parametrize("method", list(METHODS))
def test_records_account_for_every_forward_and_change_nothing(models, method):
    observer = RecordingObserver()
    out = _generate(models, method, observer)
    plain = _generate(models, method)
    assert [s.tolist() for s in out.sequences] == [s.tolist() for s in plain.sequences]
    total = out.stats.total
    for role in ("target", "draft", "ref"):
        assert observer.forward_total(role, "calls") == getattr(total, f"{role}_calls")
        assert observer.forward_total(role, "tokens") == getattr(total, f"{role}_tokens")
        # every forward ran over the whole batch of its record
        assert observer.forward_total(role, "row_calls") == sum(
            r.forwards[role].calls * len(r.rows) for r in observer.records if role in r.forwards)
    assert all(r.method == method and r.op_seconds is None for r in observer.records)
    assert all(c.seconds is None for r in observer.records for c in r.forwards.values())
    kinds = {r.kind for r in observer.records}
    if method in ("sss", "sss-paper", "sss-sir", "sd"):
        assert "round" in kinds and sum(len(r.rows) for r in observer.rounds()) == total.rounds
    else:
        assert "step" in kinds and "round" not in kinds
    assert ("score" in kinds) == (method == "soft-bon")


@pytest.mark.parametrize("method", ["sss", "sss-paper", "sd"])
def test_round_records_hold_the_verify_output_and_the_emitted_tokens(models, method):
    observer = RecordingObserver()
    out = _generate(models, method, observer, max_new_tokens=11)
    emitted = {row: [] for row in range(len(PROMPTS))}
    log_z = torch.zeros(len(PROMPTS), dtype=torch.float64)
    accepted = 0
    for record in observer.rounds():
        verify = record.verify
        assert record.logits is None  # dropped by RecordingObserver unless keep_logits
        assert verify.tokens.shape == (len(record.rows), record.draft_tokens.shape[1] + 1)
        assert torch.equal(record.tokens, verify.tokens)
        assert bool((record.num_emitted <= verify.num_accepted + 1).all())
        assert (record.carried is None) == (method != "sd")
        accepted += int(verify.num_accepted.sum())
        for b, row in enumerate(record.rows.tolist()):
            n = int(record.num_emitted[b])
            emitted[row] += record.tokens[b, :n].tolist()
            log_z[row] += float(verify.log_z[b, :n].double().sum())
        z = record.emitted_log_z
        assert z.numel() == int((verify.num_accepted + 1).sum())
        if method == "sd":
            assert bool((z == 0).all())
    assert [emitted[row] for row in range(len(PROMPTS))] == [s.tolist() for s in out.sequences]
    assert accepted == out.stats.total.accepted_drafts
    if method != "sd":
        assert log_z.tolist() == pytest.approx(out.log_z, abs=1e-5)


def test_timings_only_with_a_clock(models):
    class Timed(Observer):
        clock = staticmethod(time.perf_counter)

        def __init__(self):
            self.op_seconds, self.forward_seconds, self.records = 0.0, {}, 0

        def on_round(self, record):
            self.records += 1
            self.op_seconds += record.op_seconds
            for role, count in record.forwards.items():
                self.forward_seconds[role] = self.forward_seconds.get(role, 0.0) + count.seconds

    timed = Timed()
    out = _generate(models, "sss", timed)
    assert timed.records > 0 and timed.op_seconds > 0
    assert set(timed.forward_seconds) == {"target", "draft", "ref"} and min(timed.forward_seconds.values()) > 0
    assert timed.op_seconds + sum(timed.forward_seconds.values()) < out.stats.total.wall_time
    calls = []
    _generate(models, "vanilla", calls.append)  # a plain callable is an observer too
    assert calls and all(r.op_seconds is None for r in calls)
    assert all(r.logits["target"].shape == (len(r.rows), 10) for r in calls if r.kind == "step")


def test_bad_observer_is_refused(models):
    with pytest.raises(ValueError, match="observer must be callable"):
        _generate(models, "sss", observer=3)
    with pytest.raises(ValueError, match="observer.clock must be a callable"):
        _generate(models, "sss", observer=type("O", (Observer,), {"clock": 1.0})())


def test_method_table_drives_generate_and_the_cli(models):
    parser = cli.build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    method_action = next(a for a in generate._actions if a.dest == "method")
    assert tuple(method_action.choices) == tuple(METHODS)
    assert get_method("sss").needs_ref and not get_method("sd").needs_ref
    assert {m.name for m in METHODS.values() if m.needs_reward} == {"bon", "spec-rejection", "soft-bon"}
    with pytest.raises(ValueError, match="already registered"):
        register(get_method("sss"))

    def echo(ctx):  # repeats each prompt's last token, through the table only
        return MethodResult(sequences=[p[-1:].repeat(ctx.config.max_new_tokens) for p in ctx.prompts],
                            extras=[{} for _ in ctx.prompts])

    register(Method("echo", echo, ("target",), description="test method"))
    try:
        q, _, _ = models
        out = sss_ext.generate(q, None, PROMPTS, method="echo", max_new_tokens=3)
        assert [s.tolist() for s in out.sequences] == [[p[-1]] * 3 for p in PROMPTS]
        with pytest.raises(ValueError, match="needs target"):
            sss_ext.generate(None, None, PROMPTS, method="echo")
    finally:
        del METHODS["echo"]
    with pytest.raises(ValueError, match="models must be a non-empty subset"):
        Method("bad", echo, ("reward",))
