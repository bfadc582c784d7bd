"""Tree verification (docs/algorithm.md §13): on chains it is ``verify``; on trees the law of the
emitted stream is the tilted target p* (exact enumeration, then chi-square on the op's samples,
with negative controls that the same test rejects); bad input gets a named ValueError; the op is
a proper torch.library citizen."""

import functools
import itertools
import math
import types
import zlib

import numpy as np
import pytest
import torch

import sss_ext
import sss_ext.reference_tree
from sss_ext.reference import tilted_scores
from sss_ext.reference_tree import Law, children_of
from sss_ext.testing import make_logits
from sss_ext.warp import warp_log_probs
from stats_helpers import chi_square_from_counts
from test_bad_input import replace, with_value

IMPLEMENTATIONS = {"reference": sss_ext.reference_tree.verify_tree, "op": sss_ext.verify_tree}


# ---------------------------------------------------------------------------------------------
# (a) Chains: verify_tree with parents [-1, 0, 1, ..., K-1] is verify, token for token.


def chain_call(batch, num_draft_tokens, vocab_size, dtype, with_ref, temperature, top_k, top_p, generator, ragged):
    """Inputs of one ``verify`` call and of the same call as a chain tree (node c = position c)."""
    num_draft = torch.randint(0, num_draft_tokens + 1, (batch,), generator=generator) if ragged else None
    target, draft, ref = (x.to(dtype) for x in make_logits(batch, num_draft_tokens + 1, vocab_size, generator))
    if not with_ref:  # the draft's logits at the bonus position (a leaf) are not read by either op
        last = torch.arange(num_draft_tokens + 1) == (num_draft_tokens if num_draft is None else num_draft[:, None])
        draft = draft.masked_fill(last[..., None], math.nan)
    draft_tokens = torch.randint(0, vocab_size, (batch, num_draft_tokens), generator=generator)
    uniforms = torch.randint(1, 2**53, (batch, num_draft_tokens + 1), generator=generator, dtype=torch.float64) * 2.0**-53
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    chain = dict(target_logits=target, draft_logits=draft, draft_tokens=draft_tokens, ref_logits=ref if with_ref else None,
                 uniforms=uniforms, num_draft_tokens=num_draft, **options)
    parents = torch.arange(-1, num_draft_tokens).expand(batch, -1).contiguous()
    tree = dict(target_logits=target, draft_logits=draft, parents=parents, ref_logits=ref if with_ref else None,
                draft_tokens=torch.cat([torch.zeros(batch, 1, dtype=torch.int64), draft_tokens], dim=1), uniforms=uniforms,
                num_nodes=None if num_draft is None else num_draft + 1, **options)
    if ragged:  # rows' columns past their bonus position must not be read by the tree either
        unused = torch.arange(num_draft_tokens + 1) > num_draft[:, None]
        tree["parents"] = tree["parents"].masked_fill(unused, 99)
        tree["uniforms"] = uniforms.masked_fill(unused, 0.0)
        tree["target_logits"] = target.masked_fill(unused[..., None], math.nan)
    return chain, tree


CHAIN_CASES = [
    # (dtype, with_ref, temperature, top_k, top_p)
    (torch.float32, True, 1.0, 0, 1.0),
    (torch.float32, True, 0.7, 5, 1.0),
    (torch.float32, False, 1.0, 0, 0.9),
    (torch.bfloat16, True, 0.9, 3, 0.8),
    (torch.float16, True, 1.3, 0, 1.0),
    (torch.float32, True, 0.0, 0, 1.0),
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CHAIN_CASES, ids=lambda c: f"{str(c[0])[6:]}-ref{c[1]}-tau{c[2]}-k{c[3]}-p{c[4]}")
def test_chain_tree_is_verify(implementation, case):
    dtype, with_ref, temperature, top_k, top_p = case
    generator = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    verify_tree = IMPLEMENTATIONS[implementation]
    for trial in range(6):
        batch, num_draft_tokens = int(torch.randint(1, 7, (1,), generator=generator)), trial
        vocab_size = [1, 2, 17, 99, 111, 989][trial]
        chain, tree = chain_call(batch, num_draft_tokens, vocab_size, dtype, with_ref, temperature, top_k, top_p, generator,
                                 ragged=trial % 2 == 1)
        expected = sss_ext.reference.verify(**chain)
        assert torch.equal(expected.tokens, sss_ext.verify(**chain).tokens)
        got = verify_tree(**tree)
        assert torch.equal(got.tokens, expected.tokens), (trial, got.tokens, expected.tokens)
        assert torch.equal(got.num_accepted, expected.num_accepted)
        emitted = torch.arange(num_draft_tokens + 1) <= expected.num_accepted[:, None]
        assert torch.equal(got.log_z[emitted], expected.log_z[emitted])
        assert torch.equal(got.log_z[~emitted], torch.zeros_like(got.log_z[~emitted]))
        path = torch.where(emitted, torch.arange(num_draft_tokens + 1), -1)
        assert torch.equal(got.path, path)


# ---------------------------------------------------------------------------------------------
# (b) Exactness on trees: toy autoregressive models given as logits per prefix.


class ToyModels:
    """Lookup-table target / draft / reference: fixed random logits for each context, rounded to
    float32 (the values the op reads). No truncation, so every token has positive probability."""

    def __init__(self, vocab_size, temperature=1.0, shift=1.0, with_ref=True, scales=(1.5, 1.5, 1.5)):
        self.vocab_size, self.temperature, self.shift, self.with_ref, self.scales = vocab_size, temperature, shift, with_ref, scales

    @functools.lru_cache(maxsize=None)
    def logits(self, context):
        """float64 values of float32 logits (q, r, d) after ``context``. Shape: 3 x (V,)."""
        def table(name, scale):
            seed = zlib.crc32(repr((name, self.vocab_size, context)).encode())
            values = scale * torch.randn(self.vocab_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            return values.to(torch.float32).to(torch.float64)
        return tuple(table(name, scale) for name, scale in zip("qrd", self.scales))

    @functools.lru_cache(maxsize=None)
    def position(self, context):
        """p* and r~ after ``context`` as numpy float64. Shape: 2 x (V,)."""
        q, r, d = self.logits(context)
        inverse_temperature = 1.0 / self.temperature
        s = tilted_scores(q, r if self.with_ref else None, d if self.with_ref else None, inverse_temperature, self.shift)
        return torch.exp(warp_log_probs(s)).numpy(), torch.exp(warp_log_probs(r * inverse_temperature)).numpy()

    def options(self):
        return dict(temperature=self.temperature, shift=self.shift)


class Tree:
    """A tree shape: ``parents[c] < c``, ``parents[0] = -1``; node c's context is the root's
    context followed by the tokens on the path to c."""

    def __init__(self, parents):
        self.parents = parents
        self.children = children_of(parents)
        self.size = len(parents)

    def contexts(self, context, tokens):
        out = [context]
        for c in range(1, self.size):
            out.append(out[self.parents[c]] + (tokens[c],))
        return out

    def drafts(self, models, context, replacement):
        """Every drafted tree after ``context``: (probability, tokens with tokens[0] = 0)."""
        choices = [range(models.vocab_size)] * (self.size - 1)
        for drafted in itertools.product(*choices):
            tokens = (0,) + drafted
            contexts = self.contexts(context, tokens)
            probability = 1.0
            for node, kids in enumerate(self.children):
                _, r_tilde = models.position(contexts[node])
                remaining = r_tilde.copy()
                for child in kids:
                    x = tokens[child]
                    probability *= remaining[x] / remaining.sum()
                    if not replacement:
                        remaining[x] = 0.0
            if probability > 0:
                yield probability, tokens

    def draw(self, models, context, replacement, rng):
        """One drafted tree after ``context`` (sequential draws, renormalised without replacement)."""
        tokens = [0] * self.size
        contexts = [context] + [None] * (self.size - 1)
        for node, kids in enumerate(self.children):
            _, r_tilde = models.position(contexts[node])
            remaining = r_tilde.copy()
            for child in kids:
                tokens[child] = x = int(rng.choice(models.vocab_size, p=remaining / remaining.sum()))
                contexts[child] = contexts[node] + (x,)
                if not replacement:
                    remaining[x] = 0.0
        return tuple(tokens)


def outcomes(models, tree, context, tokens, replacement, rule="exact"):
    """Every (probability, path, last token, uniforms) of verifying one drafted tree: the rule of
    docs/algorithm.md §13 evaluated exactly; the uniforms sit inside each outcome's cell.

    ``rule`` "unnormalised" (the residual kept without dividing by its mass) and "no-subtract"
    (p kept after a rejection) are the negative controls' wrong rules."""
    out = []

    def visit(node, node_context, p, q, child_index, probability, path, coins):
        kids = tree.children[node]
        if child_index == len(kids):
            cumulative = np.cumsum(p)  # the inverse-CDF draw normalises p
            for v in range(models.vocab_size):
                if p[v] > 0:
                    final = (cumulative[v] - p[v] / 2) / cumulative[-1]
                    out.append((probability * p[v] / cumulative[-1], path, v, coins + [(tree.size - 1, final)]))
            return
        child = kids[child_index]
        x = tokens[child]
        ratio = min(1.0, p[x] / q[x]) if p[x] > 0 and q[x] > 0 else 0.0
        if ratio > 0:
            fresh_p, fresh_q = models.position(node_context + (x,))
            visit(child, node_context + (x,), fresh_p, fresh_q, 0, probability * ratio, path + [child],
                  coins + [(child - 1, ratio / 2)])
        if ratio < 1:
            residual = np.maximum(p - q, 0.0)
            p_next = residual / residual.sum() if residual.sum() > 0 else p
            if rule == "unnormalised":
                p_next = residual if residual.sum() > 0 else p
            elif rule == "no-subtract":
                p_next = p
            q_next = q
            if not replacement:
                q_next = q.copy()
                q_next[x] = 0.0
                q_next = q_next / q_next.sum() if q_next.sum() > 0 else q_next
            visit(node, node_context, p_next, q_next, child_index + 1, probability * (1 - ratio), path,
                  coins + [(child - 1, (1 + ratio) / 2)])

    p_star, r_tilde = models.position(context)
    visit(0, context, p_star, r_tilde, 0, 1.0, [0], [])
    return out


HORIZON = 3


def stream_law(models, tree, replacement, context=(), horizon=HORIZON, rule="exact", drafted_replacement=None):
    """Law of the first ``horizon`` emitted tokens, rounds chained from ``context``; the drafts
    drawn with ``drafted_replacement`` (default: as verified)."""
    drafted_replacement = replacement if drafted_replacement is None else drafted_replacement
    round_law = {}
    for draft_probability, tokens in tree.drafts(models, context, drafted_replacement):
        for probability, path, last, _ in outcomes(models, tree, context, tokens, replacement, rule):
            emitted = tuple(tokens[c] for c in path[1:]) + (last,)
            round_law[emitted] = round_law.get(emitted, 0.0) + draft_probability * probability
    law = {}
    for emitted, probability in round_law.items():
        if len(emitted) >= horizon:
            law[emitted[:horizon]] = law.get(emitted[:horizon], 0.0) + probability
            continue
        rest_law = stream_law(models, tree, replacement, context + emitted, horizon - len(emitted), rule, drafted_replacement)
        for rest, rest_probability in rest_law.items():
            law[emitted + rest] = law.get(emitted + rest, 0.0) + probability * rest_probability
    return law


def target_law(models, horizon=HORIZON):
    """prod_t p*(y_t | y_<t) over every sequence of ``horizon`` tokens."""
    return {y: math.prod(float(models.position(y[:t])[0][v]) for t, v in enumerate(y))
            for y in itertools.product(range(models.vocab_size), repeat=horizon)}


TREES = {
    "depth2-branch2": ([-1, 0, 0, 1, 1, 2, 2], 3),
    "depth2-branch3": ([-1, 0, 0, 0, 1, 1], 4),
    "depth3-branch1to2": ([-1, 0, 0, 1, 3], 4),
    "depth3-branch2-V5": ([-1, 0, 1, 1, 2], 5),
}


@pytest.mark.parametrize("replacement", [True, False], ids=["iid", "without-replacement"])
@pytest.mark.parametrize("shape", TREES)
def test_enumerated_stream_law_is_the_tilted_target(shape, replacement):
    parents, vocab_size = TREES[shape]
    models = ToyModels(vocab_size, temperature=0.9, shift=1.0)
    law, expected = stream_law(models, Tree(parents), replacement), target_law(models)
    assert abs(sum(law.values()) - 1.0) < 1e-12
    assert max(abs(law.get(y, 0.0) - expected[y]) for y in expected) < 1e-9


def control_models():
    """A root with four children over V = 4 and a peaked draft: the wrong rules are far from p*."""
    return ToyModels(4, temperature=0.9, shift=1.0, scales=(2.0, 3.0, 1.0)), Tree([-1, 0, 0, 0, 0])


def test_enumerated_controls_are_far_from_the_tilted_target():
    """The negative controls' exact laws, so that the chi-square controls below test something."""
    models, tree = control_models()
    expected = target_law(models, 2)
    for options in (dict(replacement=False, rule="unnormalised"), dict(replacement=True, rule="no-subtract"),
                    dict(replacement=False, drafted_replacement=True)):
        law = stream_law(models, tree, horizon=2, **options)
        assert 0.5 * sum(abs(law.get(y, 0.0) - expected[y]) for y in expected) > 0.05, options


def realised_outcomes(models, tree, replacement, contexts):
    """Rows whose uniforms sit inside every enumerated outcome of the drafted trees after
    ``contexts``, and the expected path and tokens. Shape: inputs (B, N, ...), (B, N), (B, N)."""
    rows, paths, emitted = [], [], []
    for context in contexts:
        for _, tokens in tree.drafts(models, context, replacement):
            for probability, path, last, coins in outcomes(models, tree, context, tokens, replacement):
                if probability < 1e-9 or any(not 1e-9 < u < 1 - 1e-9 for _, u in coins):
                    continue  # keep probes away from rounding at the cell boundaries
                uniforms = [0.5] * tree.size
                for column, u in coins:
                    uniforms[column] = u
                rows.append((tree.contexts(context, tokens), tokens, uniforms))
                paths.append(path + [-1] * (tree.size - len(path)))
                emitted.append([tokens[c] for c in path[1:]] + [last] + [-1] * (tree.size - len(path)))
    inputs = tree_inputs(models, tree, [(node_contexts, tokens) for node_contexts, tokens, _ in rows])
    inputs["uniforms"] = torch.tensor([u for _, _, u in rows], dtype=torch.float64)
    return inputs, torch.tensor(paths), torch.tensor(emitted)


def tree_inputs(models, tree, rows):
    """verify_tree's inputs for drafted trees given as (node contexts, tokens). Shape: (B, N, V) ..."""
    logits = [torch.stack([torch.stack(models.logits(c)) for c in contexts]) for contexts, _ in rows]  # (N, 3, V) each
    stacked = torch.stack(logits).to(torch.float32)  # (B, N, 3, V)
    return dict(target_logits=stacked[:, :, 0], draft_logits=stacked[:, :, 1],
                ref_logits=stacked[:, :, 2] if models.with_ref else None,
                draft_tokens=torch.tensor([tokens for _, tokens in rows]),
                parents=torch.tensor([tree.parents] * len(rows)))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("replacement", [True, False], ids=["iid", "without-replacement"])
@pytest.mark.parametrize("shape", ["depth2-branch3", "depth3-branch1to2"])
def test_every_enumerated_outcome_is_realised(implementation, shape, replacement):
    """The enumerated law is the law the op and the reference implement: with uniforms inside each
    outcome's cell they take that outcome's path and emit its tokens."""
    parents, vocab_size = TREES[shape]
    models, tree = ToyModels(vocab_size, temperature=0.9, shift=1.0), Tree(parents)
    inputs, paths, emitted = realised_outcomes(models, tree, replacement, [(), (1,)])
    if implementation == "reference":  # the reference walks row by row in Python: every 5th row
        inputs = {k: v if v is None else v[::5] for k, v in inputs.items()}
        paths, emitted = paths[::5], emitted[::5]
    out = IMPLEMENTATIONS[implementation](**inputs, replacement=replacement, **models.options())
    assert torch.equal(out.path, paths)
    assert torch.equal(out.tokens, emitted)


def sampled_stream_pvalue(models, tree, replacement, verify_tree, num_samples, seed, horizon=2, drafted_replacement=None):
    """Chi-square p-value of the first ``horizon`` tokens emitted by ``verify_tree`` over chained
    rounds (drafts drawn afresh each round) against prod_t p*."""
    drafted_replacement = replacement if drafted_replacement is None else drafted_replacement
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    streams = [()] * num_samples
    while True:
        active = [i for i, stream in enumerate(streams) if len(stream) < horizon]
        if not active:
            break
        drafted = [tree.draw(models, streams[i], drafted_replacement, rng) for i in active]
        inputs = tree_inputs(models, tree, [(tree.contexts(streams[i], tokens), tokens) for i, tokens in zip(active, drafted)])
        out = verify_tree(**inputs, replacement=replacement, generator=generator, **models.options())
        for row, i in enumerate(active):
            streams[i] = streams[i] + tuple(out.tokens[row, : int(out.num_accepted[row]) + 1].tolist())
    categories = list(itertools.product(range(models.vocab_size), repeat=horizon))
    index = {y: k for k, y in enumerate(categories)}
    counts = np.bincount([index[stream[:horizon]] for stream in streams], minlength=len(categories)).astype(float)
    expected = target_law(models, horizon)
    return chi_square_from_counts(counts, np.array([expected[y] for y in categories]))


@pytest.mark.parametrize("replacement", [True, False], ids=["iid", "without-replacement"])
@pytest.mark.parametrize("shape", TREES)
def test_op_samples_follow_the_tilted_target(shape, replacement):
    parents, vocab_size = TREES[shape]
    models = ToyModels(vocab_size, temperature=0.9, shift=1.0)
    pvalue = sampled_stream_pvalue(models, Tree(parents), replacement, sss_ext.verify_tree, 6000, seed=len(parents) + replacement)
    print(f"chi-square p-value {shape} replacement={replacement}: {pvalue:.3g}")
    assert pvalue > 1e-3


correct_after_rejection = sss_ext.reference_tree.after_rejection


def unnormalised_residual(p, q, token, replacement):
    """Wrong rule: the residual (p - q)+ is kept without dividing by its mass."""
    p_next, q_next = correct_after_rejection(p, q, token, replacement)
    return (Law(p_next.weights, 1.0) if p_next is not p else p), q_next


def residual_without_subtraction(p, q, token, replacement):
    """Wrong rule: p is kept after a rejection."""
    return p, correct_after_rejection(p, q, token, replacement)[1]


@pytest.mark.parametrize("control", ["honest", "unnormalised-residual", "no-subtraction", "iid-drafts-verified-without-replacement"])
def test_chi_square_rejects_the_wrong_rules(control, monkeypatch):
    """Negative controls: the chi-square test above rejects a reference with a wrong residual
    update, and the op fed i.i.d. siblings but told they were drawn without replacement; the
    honest reference passes it on the same models."""
    models, tree = control_models()
    options = dict(replacement=False, verify_tree=sss_ext.reference_tree.verify_tree)
    if control == "unnormalised-residual":
        monkeypatch.setattr(sss_ext.reference_tree, "after_rejection", unnormalised_residual)
    elif control == "no-subtraction":
        monkeypatch.setattr(sss_ext.reference_tree, "after_rejection", residual_without_subtraction)
    elif control == "iid-drafts-verified-without-replacement":
        options = dict(replacement=False, drafted_replacement=True, verify_tree=sss_ext.verify_tree)
    pvalue = sampled_stream_pvalue(models, tree, num_samples=6000, seed=7, **options)
    print(f"chi-square p-value of the control {control}: {pvalue:.3g}")
    assert pvalue > 1e-3 if control == "honest" else pvalue < 1e-6


# ---------------------------------------------------------------------------------------------
# The op equals the reference token for token on random trees.


def random_tree_call(batch, max_nodes, vocab_size, dtype, with_ref, generator, ragged):
    """Random trees (parents[c] uniform in [0, c)), drafts partly from the draft's argmax so that
    some are accepted, ragged node counts with garbage past them. Shape: (B, N, V) ..."""
    target, draft, ref = (x.to(dtype) for x in make_logits(batch, max_nodes, vocab_size, generator))
    parents = torch.tensor([[-1] + [int(torch.randint(0, c, (1,), generator=generator)) for c in range(1, max_nodes)]
                            for _ in range(batch)], dtype=torch.int64).reshape(batch, max_nodes)
    parent_draft = draft.gather(1, parents.clamp(min=0)[..., None].expand(-1, -1, vocab_size))  # (B, N, V)
    likely = parent_draft.float().argmax(dim=-1)
    draft_tokens = torch.where(torch.rand(batch, max_nodes, generator=generator) < 0.5, likely,
                               torch.randint(0, vocab_size, (batch, max_nodes), generator=generator))
    uniforms = torch.randint(1, 2**53, (batch, max_nodes), generator=generator, dtype=torch.float64) * 2.0**-53
    call = dict(target_logits=target, draft_logits=draft, draft_tokens=draft_tokens, parents=parents,
                ref_logits=ref if with_ref else None, uniforms=uniforms)
    if ragged:
        num_nodes = torch.randint(1, max_nodes + 1, (batch,), generator=generator)
        unused = torch.arange(max_nodes) >= num_nodes[:, None]
        call.update(num_nodes=num_nodes, parents=parents.masked_fill(unused, 77), draft_tokens=draft_tokens.masked_fill(unused, -5),
                    uniforms=uniforms.masked_fill(unused, 2.0), target_logits=target.masked_fill(unused[..., None], math.inf))
    return call


RANDOM_TREE_CASES = [
    # (dtype, with_ref, temperature, top_k, top_p, shift, top_k_ties)
    (torch.float32, True, 1.0, 0, 1.0, 1.0, "keep"),
    (torch.float32, True, 0.6, 4, 1.0, 2.0, "exact-k"),
    (torch.float32, False, 1.0, 0, 0.85, 1.0, "keep"),
    (torch.bfloat16, True, 0.9, 3, 0.9, 1.0, "keep"),
    (torch.float16, True, 1.2, 0, 1.0, 0.5, "keep"),
    (torch.float32, True, 1.0, 0, 1.0, 0.0, "keep"),
    (torch.float32, True, 0.0, 0, 1.0, 1.0, "keep"),
    (torch.bfloat16, False, 0.0, 0, 1.0, 1.0, "keep"),
]


@pytest.mark.parametrize("replacement", [True, False], ids=["iid", "without-replacement"])
@pytest.mark.parametrize("case", RANDOM_TREE_CASES, ids=lambda c: f"{str(c[0])[6:]}-ref{c[1]}-tau{c[2]}-k{c[3]}-p{c[4]}-lam{c[5]}-{c[6]}")
def test_op_matches_reference_on_random_trees(case, replacement):
    dtype, with_ref, temperature, top_k, top_p, shift, top_k_ties = case
    generator = torch.Generator().manual_seed(zlib.crc32(repr((case, replacement)).encode()))
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, shift=shift, top_k_ties=top_k_ties, replacement=replacement)
    for vocab_size, max_nodes in [(1, 4), (2, 7), (99, 9), (111, 6), (989, 5)]:
        call = random_tree_call(5, max_nodes, vocab_size, dtype, with_ref, generator, ragged=vocab_size % 2 == 1)
        expected = sss_ext.reference_tree.verify_tree(**call, **options)
        got = sss_ext.verify_tree(**call, **options)
        for name in ("path", "tokens", "num_accepted", "log_z"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), (vocab_size, name, got, expected)


@pytest.mark.parametrize("top_k", [0, 1])
def test_proposal_exhausted_without_replacement(top_k):
    """More children than tokens in r~'s support (top-1: one token): once every token is removed,
    q has no mass and the remaining children are rejected; the last token comes from p."""
    logits = lambda values: torch.tensor(values).expand(3, 5, 2)  # noqa: E731  (B, N, V) = (3, 5, 2)
    call = dict(target_logits=logits([0.0, 6.0]), draft_logits=logits([3.0, 0.0]), ref_logits=logits([0.0, 0.0]),
                draft_tokens=torch.tensor([[0, 0, 1, 0, 1]] * 3), parents=torch.tensor([[-1, 0, 0, 0, 0]] * 3),
                uniforms=torch.tensor([[1 - 2**-53] * 5, [0.3, 0.9, 0.2, 0.7, 0.4], [0.5] * 5], dtype=torch.float64))
    expected = sss_ext.reference_tree.verify_tree(**call, replacement=False, top_k=top_k)
    got = sss_ext.verify_tree(**call, replacement=False, top_k=top_k)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    if top_k == 1:  # p* = 1[v = 1], r~ = 1[v = 0]: child 0 rejected, then q is empty
        assert expected.num_accepted.tolist() == [0, 0, 0] and expected.tokens[:, 0].tolist() == [1, 1, 1]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_empty_batch_and_root_only_trees(implementation):
    verify_tree = IMPLEMENTATIONS[implementation]
    empty = verify_tree(torch.zeros(0, 3, 5), torch.zeros(0, 3, 5), torch.zeros(0, 3, dtype=torch.int64),
                        torch.zeros(0, 3, dtype=torch.int64), torch.zeros(0, 3, 5))
    assert [tuple(t.shape) for t in empty] == [(0, 3), (0, 3), (0,), (0, 3)]
    logits = torch.tensor([[[0.0, 1.0, 5.0]], [[9.0, 0.0, 0.0]]])  # (B, N, V) = (2, 1, 3): one draw from p* at the root
    root = verify_tree(logits, logits, torch.zeros(2, 1, dtype=torch.int64), torch.full((2, 1), -1), None, temperature=0.0)
    assert root.path.tolist() == [[0], [0]] and root.tokens.tolist() == [[2], [0]] and root.num_accepted.tolist() == [0, 0]


def test_results_do_not_depend_on_the_thread_count():
    call = random_tree_call(64, 8, 300, torch.float32, True, torch.Generator().manual_seed(3), ragged=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = sss_ext.verify_tree(**call, replacement=False, top_k=50)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(sss_ext.verify_tree(**call, replacement=False, top_k=50), serial):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# (c) Bad input: a ValueError naming the argument and what was expected.

B, N, V = 2, 4, 7


def good_tree_call():
    generator = torch.Generator().manual_seed(0)
    return dict(
        target_logits=torch.randn(B, N, V, generator=generator),
        draft_logits=torch.randn(B, N, V, generator=generator),
        draft_tokens=torch.randint(0, V, (B, N), generator=generator),
        parents=torch.tensor([[-1, 0, 0, 1], [-1, 0, 1, 2]]),
        ref_logits=torch.randn(B, N, V, generator=generator),
        uniforms=torch.full((B, N), 0.5, dtype=torch.float64),
        num_nodes=None, temperature=1.0, top_k=0, top_p=1.0, shift=1.0, mode="exact", top_k_ties="keep", replacement=True,
    )


# (id, mutation of the keyword arguments, pattern the message must contain)
BAD_INPUT = [
    ("target 2-D", replace("target_logits", lambda k: k["target_logits"][0]), r"target_logits must be 3-D"),
    ("target int", replace("target_logits", lambda k: k["target_logits"].long()), r"target_logits must have dtype float32, bfloat16 or float16"),
    ("draft shape", replace("draft_logits", lambda k: k["draft_logits"][:, :N - 1]), r"draft_logits must have shape \(B, N, V\) = \(2, 4, 7\)"),
    ("draft None", replace("draft_logits", None), r"draft_logits must be a torch.Tensor"),
    ("ref vocab", replace("ref_logits", lambda k: k["ref_logits"][..., :V - 1]), r"ref_logits must have shape \(B, N, V\) = \(2, 4, 7\)"),
    ("mixed dtypes", replace("draft_logits", lambda k: k["draft_logits"].half()), r"draft_logits must have the dtype of target_logits"),
    ("tokens int32", replace("draft_tokens", lambda k: k["draft_tokens"].int()), r"draft_tokens must (have dtype int64|be an int64 tensor)"),
    ("tokens shape", replace("draft_tokens", lambda k: k["draft_tokens"][:, :N - 1]),
     r"draft_tokens must (have shape|be an int64 tensor of shape) \(B, N\)"),
    ("parents int32", replace("parents", lambda k: k["parents"].int()), r"parents must (have dtype int64|be an int64 tensor)"),
    ("parents shape", replace("parents", lambda k: k["parents"][:1]), r"parents must (have shape|be an int64 tensor of shape) \(B, N\)"),
    ("parents list", replace("parents", [[-1, 0, 0, 1], [-1, 0, 1, 2]]), r"parents must be a torch.Tensor"),
    ("root parent", with_value("parents", (1, 0), 0), r"parents\[b, 0\] must be -1 \(node 0 is the root\), found 0 at row 1"),
    ("parent = own index", with_value("parents", (0, 2), 2), r"parents must satisfy 0 <= parents\[b, c\] < c .*found 2 at \(row, node\) \(0, 2\)"),
    ("parent after node", with_value("parents", (1, 3), 5), r"parents must satisfy 0 <= parents\[b, c\] < c .*found 5"),
    ("parent -1", with_value("parents", (1, 1), -1), r"parents must satisfy 0 <= parents\[b, c\] < c .*found -1"),
    ("num_nodes 0", replace("num_nodes", torch.tensor([2, 0])), r"num_nodes must hold values in \[1, N\] = \[1, 4\], found 0 at row 1"),
    ("num_nodes N+1", replace("num_nodes", torch.tensor([5, 1])), r"num_nodes must hold values in \[1, N\] = \[1, 4\], found 5 at row 0"),
    ("num_nodes int32", replace("num_nodes", torch.tensor([2, 1], dtype=torch.int32)), r"num_nodes must (have dtype int64|be an int64 tensor)"),
    ("num_nodes shape", replace("num_nodes", torch.tensor([2])), r"num_nodes must (have shape|be an int64 tensor of shape) \(B,\)"),
    ("token id V", with_value("draft_tokens", (1, 2), V), r"draft_tokens must hold token ids in \[0, 7\) at nodes c >= 1, found 7"),
    ("token id -1", with_value("draft_tokens", (0, 3), -1), r"draft_tokens must hold token ids in \[0, 7\) at nodes c >= 1, found -1"),
    ("uniform 0", with_value("uniforms", (0, 1), 0.0), r"uniforms must lie in the open interval \(0, 1\)"),
    ("uniform 1", with_value("uniforms", (1, N - 1), 1.0), r"uniforms must lie in the open interval \(0, 1\)"),
    ("uniform NaN", with_value("uniforms", (1, 0), math.nan), r"uniforms must lie in the open interval \(0, 1\)"),
    ("uniforms float32", replace("uniforms", lambda k: k["uniforms"].float()), r"uniforms must (have dtype float64|be a float64 tensor)"),
    ("uniforms shape", replace("uniforms", lambda k: k["uniforms"][:, : N - 1]), r"uniforms must (have shape|be a float64 tensor of shape) \(B, N\)"),
    ("NaN target", with_value("target_logits", (1, 1, 3), math.nan), r"target_logits must be finite or -inf"),
    ("+inf draft", with_value("draft_logits", (0, 3, 0), math.inf), r"draft_logits must be finite or -inf"),
    ("NaN ref", with_value("ref_logits", (0, 0, 6), math.nan), r"ref_logits must be finite or -inf"),
    ("-inf row", with_value("ref_logits", (1, 2), -math.inf), r"ref_logits has a row with every logit -inf"),
    ("devices", replace("draft_logits", lambda k: k["draft_logits"].to("meta")), r"all tensors must be on one device"),
    ("temperature", replace("temperature", -0.5), r"temperature must be a finite float >= 0"),
    ("top_p", replace("top_p", 1.5), r"top_p must be a float in \(0, 1\]"),
    ("top_k", replace("top_k", -1), r"top_k must be an int >= 0"),
    ("shift", replace("shift", -1.0), r"shift \(lambda\) must be a finite float >= 0"),
    ("top_k_ties", replace("top_k_ties", "ties"), r"top_k_ties must be"),
    ("mode paper", replace("mode", "paper"), r"mode must be 'exact' for tree verification"),
    ("replacement", replace("replacement", "yes"), r"replacement must be a bool"),
]
# Row 0 has 2 nodes: nothing past them is read or checked.
UNREAD = [with_value("parents", (0, 3), 9), with_value("draft_tokens", (0, 2), -3), with_value("uniforms", (0, 3), 0.0),
          with_value("target_logits", (0, 2, 1), math.nan), with_value("ref_logits", (0, 3), -math.inf)]


def bad_tree_call(mutate):
    kwargs = good_tree_call()
    mutate(kwargs)
    return kwargs


@pytest.mark.parametrize("case_id,mutate,pattern", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
@pytest.mark.parametrize("entry", ["op", "reference"])
def test_verify_tree_rejects_bad_input(entry, case_id, mutate, pattern):
    verify_tree = IMPLEMENTATIONS[entry]
    with pytest.raises(ValueError, match=pattern):
        verify_tree(**bad_tree_call(mutate))


CPP_CASES = [c for c in BAD_INPUT if c[0] not in ("devices", "draft None", "parents list", "replacement")]


@pytest.mark.parametrize("case_id,mutate,pattern", CPP_CASES, ids=[c[0] for c in CPP_CASES])
def test_registered_op_checks_in_cpp(case_id, mutate, pattern):
    """The C++ adapter validates too: calling torch.ops.sss_ext.verify_tree directly cannot crash."""
    k = bad_tree_call(mutate)
    with pytest.raises(ValueError, match=pattern):
        torch.ops.sss_ext.verify_tree(k["target_logits"], k["draft_logits"], k["draft_tokens"], k["parents"], k["ref_logits"],
                                      k["uniforms"], k["temperature"], k["top_k"], k["top_p"], k["shift"], k["mode"],
                                      k["replacement"], k["num_nodes"], k["top_k_ties"])


@pytest.mark.parametrize("entry", ["op", "reference"])
def test_nothing_past_a_rows_nodes_is_read(entry):
    expected = IMPLEMENTATIONS[entry](**bad_tree_call(replace("num_nodes", torch.tensor([2, 4]))))
    kwargs = bad_tree_call(replace("num_nodes", torch.tensor([2, 4])))
    for mutate in UNREAD:
        mutate(kwargs)
    got = IMPLEMENTATIONS[entry](**kwargs)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("entry", ["op", "reference"])
def test_leaf_draft_logits_are_read_only_for_the_tilt(entry):
    """Like verify's bonus position: without a tilt the draft's logits at a leaf are not read."""
    kwargs = good_tree_call()  # leaves: nodes 2, 3 of row 0 and node 3 of row 1
    kwargs["ref_logits"] = None
    expected = IMPLEMENTATIONS[entry](**kwargs)
    kwargs["draft_logits"] = kwargs["draft_logits"].clone()
    kwargs["draft_logits"][0, 2:] = math.nan
    kwargs["draft_logits"][1, 3] = -math.inf
    for a, b in zip(IMPLEMENTATIONS[entry](**kwargs), expected):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="draft_logits must be finite or -inf"):
        IMPLEMENTATIONS[entry](**{**kwargs, "ref_logits": good_tree_call()["ref_logits"]})


def test_cuda_tensors_without_cuda_build_are_refused_naming_the_device(monkeypatch):
    """A build without CUDA kernels: CUDA tensors get verify's ValueError, not a dispatcher error."""
    monkeypatch.setitem(sss_ext.ops.BUILD_INFO, "cuda", False)
    fake_cuda_tensor = types.SimpleNamespace(device=torch.device("cuda", 0), shape=(B, N, V))
    kwargs = good_tree_call()
    kwargs["target_logits"] = fake_cuda_tensor
    with pytest.raises(ValueError, match=r"target_logits is on cuda:0, but this sss_ext build has no CUDA kernels"):
        sss_ext.verify_tree(**kwargs)


# ---------------------------------------------------------------------------------------------
# (d) Registration: schema, fake kernel, opcheck, torch.compile.


def op_args(dtype=torch.float32, with_ref=True, temperature=0.8, top_k=0, top_p=1.0, replacement=True, ragged=False,
            top_k_ties="keep"):
    call = random_tree_call(3, 6, 33, dtype, with_ref, torch.Generator().manual_seed(5), ragged)
    return (call["target_logits"], call["draft_logits"], call["draft_tokens"], call["parents"], call["ref_logits"], call["uniforms"],
            temperature, top_k, top_p, 1.0, "exact", replacement, call.get("num_nodes"), top_k_ties)


def test_verify_tree_schema_is_registered():
    schema = str(torch.ops.sss_ext.verify_tree.default._schema)
    assert schema.startswith("sss_ext::verify_tree(Tensor target_logits, Tensor draft_logits, Tensor draft_tokens, Tensor parents, "
                             "Tensor? ref_logits, Tensor uniforms,"), schema
    assert 'bool replacement, Tensor? num_nodes=None, str top_k_ties="keep") -> (Tensor, Tensor, Tensor, Tensor)' in schema
    assert "verify_tree" in sss_ext.BUILD_INFO["cpu_kernels"]


@pytest.mark.parametrize(
    "options",
    [dict(), dict(with_ref=False), dict(dtype=torch.bfloat16, top_k=5), dict(dtype=torch.float16, top_p=0.9, top_k_ties="exact-k"),
     dict(replacement=False, ragged=True), dict(temperature=0.0)],
    ids=["exact", "sd", "bf16-topk", "fp16-topp-exact-k", "without-replacement-ragged", "greedy"],
)
def test_opcheck_verify_tree(options):
    torch.library.opcheck(torch.ops.sss_ext.verify_tree.default, op_args(**options))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in op_args()]
    with mode:
        path, tokens, num_accepted, log_z = torch.ops.sss_ext.verify_tree.default(*args)
    assert path.shape == tokens.shape == log_z.shape == (3, 6) and num_accepted.shape == (3,)
    assert path.dtype == tokens.dtype == num_accepted.dtype == torch.int64 and log_z.dtype == torch.float32


def test_torch_compile_fullgraph_matches_eager():
    call = random_tree_call(4, 7, 50, torch.float32, True, torch.Generator().manual_seed(9), ragged=True)

    def round_and_first_token(target_logits, draft_logits, draft_tokens, parents, ref_logits, uniforms, num_nodes):
        result = sss_ext.verify_tree(target_logits, draft_logits, draft_tokens, parents, ref_logits, num_nodes=num_nodes,
                                     uniforms=uniforms, replacement=False, temperature=0.9)
        return result.path, result.tokens, result.num_accepted, result.log_z, result.tokens[:, 0] + 1

    args = tuple(call[k] for k in ("target_logits", "draft_logits", "draft_tokens", "parents", "ref_logits", "uniforms", "num_nodes"))
    compiled = torch.compile(round_and_first_token, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(*args), round_and_first_token(*args)):
        assert torch.equal(got, expected)


def test_random_calls_either_agree_or_both_refuse():
    """Random shapes, masks, extreme values and defects: the op and the reference either return
    the same outputs or both raise a ValueError (the first defect each meets may differ)."""
    generator = torch.Generator().manual_seed(11)
    randint = lambda low, high: int(torch.randint(low, high, (1,), generator=generator))  # noqa: E731
    outcomes_seen = {"equal": 0, "refused": 0}
    for _ in range(150):
        batch, max_nodes, vocab_size = randint(0, 4), randint(1, 7), randint(1, 40)
        dtype = [torch.float32, torch.bfloat16, torch.float16][randint(0, 3)]
        call = random_tree_call(batch, max_nodes, vocab_size, dtype, randint(0, 2) == 1, generator, ragged=randint(0, 2) == 1)
        for name in ("target_logits", "draft_logits", "ref_logits"):
            if call[name] is not None and randint(0, 3) == 0:  # mask tokens, sometimes whole rows
                call[name] = call[name].masked_fill(torch.rand(call[name].shape, generator=generator) < 0.5, -math.inf)
            if call[name] is not None and randint(0, 12) == 0 and call[name].numel():
                call[name] = call[name].clone()
                call[name].view(-1)[randint(0, call[name].numel())] = [math.nan, math.inf, 6e4][randint(0, 3)]
        if randint(0, 10) == 0 and batch:
            call["parents"] = call["parents"].clone()
            call["parents"][randint(0, batch), randint(0, max_nodes)] = randint(-2, max_nodes + 1)
        if randint(0, 10) == 0 and batch:
            call["draft_tokens"] = call["draft_tokens"].clone()
            call["draft_tokens"][randint(0, batch), randint(0, max_nodes)] = randint(-1, vocab_size + 2)
        if randint(0, 10) == 0 and batch:
            call["uniforms"] = call["uniforms"].clone()
            call["uniforms"][randint(0, batch), randint(0, max_nodes)] = [0.0, 1.0, math.nan][randint(0, 3)]
        options = dict(temperature=[0.0, 1e-3, 0.7, 1.0][randint(0, 4)], top_k=[0, 1, 3][randint(0, 3)], top_p=[1.0, 0.8][randint(0, 2)],
                       shift=[0.0, 1.0, 2.5][randint(0, 3)], replacement=randint(0, 2) == 1,
                       top_k_ties=["keep", "exact-k"][randint(0, 2)])
        results = []
        for verify_tree in (sss_ext.verify_tree, sss_ext.reference_tree.verify_tree):
            try:
                results.append(verify_tree(**call, **options))
            except ValueError as error:
                results.append(error)
        got, expected = results
        if isinstance(expected, ValueError) or isinstance(got, ValueError):
            assert isinstance(got, ValueError) and isinstance(expected, ValueError), (got, expected, options)
            outcomes_seen["refused"] += 1
            continue
        for a, b in zip(got, expected):
            assert torch.equal(a, b), (got, expected, options)
        outcomes_seen["equal"] += 1
    print(f"random calls: {outcomes_seen}")
    assert min(outcomes_seen.values()) >= 20, outcomes_seen
