"""Tree drafting in the decoding loop (``SamplingConfig.draft_tree``).

The law of whole generated sequences is compared with the exact law by enumeration
(chi-square, alpha = 0.01) for sss and sd, both sibling rules, and under temperature / top-k;
negative controls must fail: the samples against the other law, and a loop whose siblings are
drawn i.i.d. but verified as drawn without replacement. The KV caches are checked against
fresh forwards at every round, greedy trees against greedy decoding, rows against the same
row in another batch, and the observer, processors and refusals.
"""

import pytest
import torch

import sss_ext
from sss_ext import SamplingConfig
from sss_ext.decoding import draft_tree
from sss_ext.decoding.observe import RecordingObserver
from decoding_helpers import (  # noqa: F401  (one_thread: autouse fixture)
    chi_square_pvalue, count_sequences, full_logits, greedy_reference, one_thread, sequence_law, tilted_probs, trio,
)

VOCAB, LENGTH, ROWS, EOS = 8, 3, 24000, 0
PROMPT = [1, 2]
ALPHA = 0.01


@pytest.fixture(scope="module")
def models():
    return trio(VOCAB)


@pytest.fixture(scope="module")
def tilted_law(models):
    return sequence_law(models, PROMPT, LENGTH, tilted_probs, eos=EOS)


@pytest.fixture(scope="module")
def target_law(models):
    return sequence_law(models, PROMPT, LENGTH, lambda q, r, d: torch.softmax(q, dim=-1), eos=EOS)


def _generate(models, method, tree, replacement, seed, **kwargs):
    q, r, d = models
    return sss_ext.generate(q, r, [PROMPT] * ROWS, ref_model=d, method=method, max_new_tokens=LENGTH, draft_tree=tree,
                            tree_replacement=replacement, eos_token_id=EOS, seed=seed, **kwargs)


@pytest.mark.parametrize("tree, replacement", [((3, 2), False), ((3, 2), True), ((2, 1, 1), False)],
                         ids=["3x2-without", "3x2-iid", "2x1x1-without"])
def test_sss_trees_match_the_tilted_law(models, tilted_law, target_law, tree, replacement):
    out = _generate(models, "sss", tree, replacement, seed=31)
    counts = count_sequences(out.sequences)
    p_value = chi_square_pvalue(counts, tilted_law)
    negative = chi_square_pvalue(counts, target_law)
    print(f"sss tree {tree} replacement={replacement}: p = {p_value:.4f}; vs prod q (negative control) p = {negative:.3g}")
    assert p_value > ALPHA
    assert negative < ALPHA
    assert 0.0 < out.stats.total.acceptance_rate < 1.0


def test_sd_tree_matches_the_target_law(models, tilted_law, target_law):
    out = _generate(models, "sd", (3, 2), False, seed=32)
    counts = count_sequences(out.sequences)
    p_value = chi_square_pvalue(counts, target_law)
    negative = chi_square_pvalue(counts, tilted_law)
    print(f"sd tree (3, 2): p = {p_value:.4f}; vs prod p* (negative control) p = {negative:.3g}")
    assert p_value > ALPHA
    assert negative < ALPHA


def test_sss_tree_with_temperature_top_k_and_shift(models):
    temperature, top_k, shift = 0.7, 5, 0.5

    def step_law(zq, zr, zd):
        return sss_ext.warp_probs(zq + shift * (zr - zd), temperature, top_k, 1.0)

    law = sequence_law(models, PROMPT, LENGTH, step_law)
    out = _generate(models, "sss", (3, 2), False, seed=33, temperature=temperature, top_k=top_k, shift=shift,
                    ignore_eos=True)
    p_value = chi_square_pvalue(count_sequences(out.sequences), law)
    print(f"sss tree (t=0.7, top_k=5, shift=0.5) vs prod p*: p = {p_value:.4f}")
    assert p_value > ALPHA


def test_control_siblings_drawn_iid_but_verified_without_replacement(models, tilted_law, monkeypatch):
    """Negative control: the loop's drafting rule and the op's sibling rule must agree."""
    draw = draft_tree.draw_children
    monkeypatch.setattr("sss_ext.decoding.tree_run.draw_children",
                        lambda logits, count, uniforms, replacement, config: draw(logits, count, uniforms, True, config))
    out = _generate(models, "sss", (4, 1), False, seed=34)
    p_value = chi_square_pvalue(count_sequences(out.sequences), tilted_law)
    print(f"sss tree, i.i.d. siblings verified without replacement (negative control): p = {p_value:.3g}")
    assert p_value < ALPHA


@pytest.mark.parametrize("method", ["sss", "sd"])
def test_every_round_reads_the_logits_of_a_fresh_forward(models, method):
    """The caches keep exactly the accepted path: at every round the logits at the root (and
    along the accepted path) equal no-cache forwards of the row's sequence so far."""
    q, r, d = models
    prompts = [[1, 2], [3, 4, 5, 6], [7]]
    observer = RecordingObserver(keep_logits=True)
    out = sss_ext.generate(q, r, prompts, ref_model=d, method=method, max_new_tokens=9, draft_tree=(2, 2, 1),
                           ignore_eos=True, seed=3, observer=observer)
    rounds = observer.rounds()
    assert rounds and all(rec.tree_parents is not None for rec in rounds)
    roles = {"target": q, "draft": r, "ref": d}
    checked = 0
    for rec in rounds:
        for i, row in enumerate(rec.rows.tolist()):
            sequence = prompts[row] + out.sequences[row].tolist()[:_emitted_before(rounds, rec, row)]
            path = rec.verify.path[i]
            for depth, node in enumerate(path[path >= 0].tolist()):
                prefix = sequence + rec.draft_tokens[i, [n for n in _path(rec.tree_parents, node)][1:]].tolist()
                for role, logits in rec.logits.items():
                    fresh = full_logits(roles[role], prefix)
                    torch.testing.assert_close(logits[i, node].double(), fresh, atol=1e-4, rtol=1e-4)
                    checked += 1
    assert checked > 3 * len(rounds)


def _path(parents, node):
    path = [node]
    while parents[path[-1]] >= 0:
        path.append(int(parents[path[-1]]))
    return path[::-1]


def _emitted_before(rounds, record, row):
    total = 0
    for rec in rounds:
        if rec is record:
            return total
        ids = rec.rows.tolist()
        if row in ids:
            total += int(rec.num_emitted[ids.index(row)])
    raise AssertionError("record not found")


def test_greedy_tree_is_greedy_decoding(models):
    q, r, d = models
    for prompt in ([1, 2], [5, 3, 3]):
        tree = sss_ext.generate(q, r, [prompt], ref_model=d, method="sss", max_new_tokens=7, draft_tree=(3, 2),
                                temperature=0.0, ignore_eos=True).sequences[0].tolist()
        expected = greedy_reference((q, r, d), prompt, 7, lambda zq, zr, zd: zq + zr - zd)
        assert tree == expected


@pytest.mark.parametrize("replacement", [False, True])
def test_one_prompt_same_tokens_alone_or_in_a_batch(models, replacement):
    q, r, d = models
    prompts = [[1, 2], [3, 4, 5, 6, 7], [6]]
    kwargs = dict(ref_model=d, method="sss", max_new_tokens=8, draft_tree=(2, 2), tree_replacement=replacement,
                  ignore_eos=True, seed=9)
    batch = sss_ext.generate(q, r, prompts, **kwargs).sequences
    for index, prompt in enumerate(prompts):
        alone = sss_ext.generate(q, r, [prompt], prompt_indices=[index], **kwargs).sequences[0]
        assert torch.equal(alone, batch[index])


def test_logits_processor_applies_at_every_node(models):
    """A processor banning a token: no tree round may emit it (the draft, target and reference
    logits of every node pass through it with the node's own path)."""
    q, r, d = models
    banned = 3
    seen_lengths = set()

    def ban(input_ids, scores):
        seen_lengths.add(input_ids.shape[1])
        scores = scores.clone()
        scores[:, banned] = float("-inf")
        return scores

    out = sss_ext.generate(q, r, [[1, 2]] * 64, ref_model=d, method="sss", max_new_tokens=6, draft_tree=(3, 2),
                           ignore_eos=True, seed=4, logits_processor=ban)
    assert all(banned not in seq.tolist() for seq in out.sequences)
    assert len(seen_lengths) >= 3  # nodes at several depths saw their own paths


@pytest.mark.parametrize("fields, match", [
    (dict(draft_tree=()), "draft_tree must be a non-empty tuple"),
    (dict(draft_tree=(2, 0)), "draft_tree must be a non-empty tuple"),
    (dict(draft_tree=(2, True)), "draft_tree must be a non-empty tuple"),
    (dict(draft_tree=(16, 16)), "at most 256"),
    (dict(draft_tree=(2,), proposer="ngram"), "draft_tree needs proposer='draft'"),
    (dict(draft_tree=(2,), draft_length_policy="adaptive"), "draft_tree needs proposer='draft'"),
    (dict(draft_tree=(2,), tree_replacement=1), "tree_replacement must be a bool"),
    (dict(draft_tree=(2,), verification="block"), "verification='block' verifies a chain of drafts"),
    (dict(verification="tree"), r"verification must be one of \('token', 'block'\)"),
])
def test_bad_tree_config(fields, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**fields)


@pytest.mark.parametrize("method", ["sss-paper", "vanilla", "bon"])
def test_methods_without_block_verification_refuse_it(models, method):
    q, r, d = models
    with pytest.raises(ValueError, match=rf"method='{method}' does not take verification='block' \(methods that do: sss, sss-sir, sd\)"):
        sss_ext.generate(q, r, [[1, 2]], ref_model=d, method=method, verification="block", max_new_tokens=2,
                         reward_fn=lambda texts: torch.zeros(len(texts)))


@pytest.mark.parametrize("method", ["sss-paper", "sss-sir", "vanilla"])
def test_methods_without_trees_refuse_them(models, method):
    q, r, d = models
    with pytest.raises(ValueError, match=rf"method='{method}' does not take draft_tree=\(2, 2\) \(methods that do: sss, sd\)"):
        sss_ext.generate(q, r, [[1, 2]], ref_model=d, method=method, draft_tree=(2, 2), max_new_tokens=2)
