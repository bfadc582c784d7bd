"""Tree verification (docs/algorithm.md §12): on chains it is ``verify``; on trees the law of the
emitted stream is the tilted target p* (exact enumeration, then chi-square on the op's samples,
with negative controls that the same test rejects); bad input gets a named ValueError; the op is
a proper torch.library citizen."""

import functools
import itertools
import math
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

IMPLEMENTATIONS = {"reference": sss_ext.reference_tree.verify_tree, "op": sss_ext.verify_tree}


# ---------------------------------------------------------------------------------------------
# (a) Chains: verify_tree with parents [-1, 0, 1, ..., K-1] is verify, token for token.


def chain_call(batch, num_draft_tokens, vocab_size, dtype, with_ref, temperature, top_k, top_p, generator, ragged):
    """Inputs of one ``verify`` call and of the same call as a chain tree (node c = position c)."""
    target, draft, ref = (x.to(dtype) for x in make_logits(batch, num_draft_tokens + 1, vocab_size, generator))
    draft_tokens = torch.randint(0, vocab_size, (batch, num_draft_tokens), generator=generator)
    uniforms = torch.randint(1, 2**53, (batch, num_draft_tokens + 1), generator=generator, dtype=torch.float64) * 2.0**-53
    num_draft = torch.randint(0, num_draft_tokens + 1, (batch,), generator=generator) if ragged else None
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
    docs/algorithm.md §12 evaluated exactly; the uniforms sit inside each outcome's cell.

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
    inputs = tree_inputs(models, tree, [(contexts_, tokens) for contexts_, tokens, _ in rows])
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


def unnormalised_residual(p, q, token, replacement):
    p_next, q_next = correct_after_rejection(p, q, token, replacement)
    return (Law(p_next.weights, 1.0) if p_next is not p else p), q_next


def residual_without_subtraction(p, q, token, replacement):
    return p, correct_after_rejection(p, q, token, replacement)[1]


correct_after_rejection = sss_ext.reference_tree.after_rejection


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
