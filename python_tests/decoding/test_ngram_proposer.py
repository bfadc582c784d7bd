"""The prompt-lookup proposer on constructed histories, and its configuration checks.

Each case states the history, the suffix that matches and the tokens that must be proposed:
no match, the longest n first, the most recent occurrence, a match so recent that its
continuation repeats with the match's period, per-row limits, and a batch where every
row's proposals equal those of the row alone.
"""

import pytest
import torch

from sss_ext import SamplingConfig
from sss_ext.decoding.ngram import histories, propose_ngrams


def _propose(rows: list[list[int]], limit, sizes=(3, 1)):
    """Proposals of ragged ``rows`` (padded with a token none of them uses) as lists."""
    width = max(len(row) for row in rows)
    history = torch.full((len(rows), width), 99, dtype=torch.int64)
    for index, row in enumerate(rows):
        history[index, : len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(row) for row in rows])
    drafts, counts = propose_ngrams(history, lengths, limit, sizes)
    return [drafts[b, : int(counts[b])].tolist() for b in range(len(rows))]


@pytest.mark.parametrize("history,expected", [
    ([1, 2, 3, 4], []),                          # no token repeats: nothing to copy
    ([5], []),                                   # a single token has no earlier occurrence
    ([], []),                                    # an empty history neither
    ([1, 2, 3, 4, 1, 2], [3, 4, 1]),             # suffix (1, 2) found at the start
    ([7, 1, 2, 8, 9, 3, 1, 2], [8, 9, 3]),       # n = 3 fails (3, 1, 2), n = 2 matches (1, 2)
    ([4, 1, 2, 5, 9, 1, 2, 6, 1, 2], [6, 1, 2]),  # most recent of two earlier occurrences of (1, 2)
    ([3, 1, 2, 6, 9, 1, 2, 3, 1, 2], [6, 9, 1]),  # n = 3: (3, 1, 2) beats the later 2-gram (1, 2)
    ([8, 5, 6, 7, 8], [5, 6, 7]),                # n = 1 only: the token 8
])
def test_proposals_on_constructed_histories(history, expected):
    assert _propose([history], 3) == [expected]


@pytest.mark.parametrize("history,expected", [
    ([5, 5, 5, 5], [5, 5, 5, 5]),        # the latest earlier (5, 5, 5) ends just before the suffix: period 1
    ([1, 2, 1, 2, 1], [2, 1, 2, 1]),     # (1, 2, 1) at 0 .. 2, period 2: continues 2, 1, 2, 1
    ([9, 7, 1, 7], [1, 7, 1, 7]),        # n = 1, 7 at column 1: continuation 1, 7 reaches the end, then repeats
])
def test_match_at_the_very_end_repeats_with_its_period(history, expected):
    assert _propose([history], 4) == [expected]


def test_smallest_size_bounds_the_lookup():
    """With sizes (3, 2) a repeated single token is no match; with (3, 1) it is."""
    history = [8, 5, 6, 7, 8]
    assert _propose([history], 2, (3, 2)) == [[]]
    assert _propose([history], 2, (3, 1)) == [[5, 6]]
    assert _propose([[1, 2, 3, 1, 2]], 2, (1, 1)) == [[3, 1]]  # only n = 1: the latest earlier 2 is at column 1


def test_per_row_limits_and_zero():
    rows = [[1, 2, 3, 1, 2], [5, 5, 5], [4, 4]]
    assert _propose(rows, torch.tensor([2, 0, 3])) == [[3, 1], [], [4, 4, 4]]
    drafts, counts = propose_ngrams(torch.tensor([[1, 2, 3]]), torch.tensor([3]), 4, (3, 1))
    assert drafts.shape == (1, 0) and counts.tolist() == [0]


def test_batch_rows_equal_rows_alone():
    """A row's proposals depend on its own history only: batched equals one by one (other widths, padding)."""
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 4, (int(n),), generator=generator).tolist()
            for n in torch.randint(1, 30, (40,), generator=generator)]
    limits = torch.randint(0, 6, (40,), generator=generator)
    batched = _propose(rows, limits)
    alone = [_propose([row], int(limit))[0] for row, limit in zip(rows, limits)]
    assert batched == alone
    assert sum(len(p) > 0 for p in batched) > 20 and any(len(p) == 0 for p in batched)


def test_brute_force_agreement():
    """Against a direct Python statement of the rule on random short histories over 3 tokens."""

    def rule(history, limit, largest=3, smallest=1):
        length = len(history)
        for n in range(largest, smallest - 1, -1):
            if length < n + 1:
                continue
            suffix = history[length - n:]
            starts = [j for j in range(length - n) if history[j:j + n] == suffix]  # j + n <= length - 1
            if starts:
                first = starts[-1] + n
                period = length - first
                out = []
                for i in range(limit):
                    column = first + i
                    out.append(history[column] if column < length else history[length - period + (column - length) % period])
                return out
        return []

    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 3, (int(n),), generator=generator).tolist()
            for n in torch.randint(0, 12, (300,), generator=generator)]
    rows = [row for row in rows if row] + [[]]
    assert _propose(rows, 5) == [rule(row, 5) for row in rows]


def test_histories_joins_prompt_and_generated():
    history, lengths = histories(torch.tensor([[1, 2, 0], [3, 4, 5]]), torch.tensor([2, 3]),
                                 torch.tensor([[7, 8, 9, 0], [6, 0, 0, 0]]), torch.tensor([3, 1]))
    assert lengths.tolist() == [5, 4]
    assert history[0, :5].tolist() == [1, 2, 7, 8, 9] and history[1, :4].tolist() == [3, 4, 5, 6]


@pytest.mark.parametrize("changes,message", [
    ({"proposer": "eagle"}, "proposer must be one of"),
    ({"proposer": "ngram", "ngram_sizes": (1, 2)}, "ngram_sizes must be two ints"),
    ({"proposer": "ngram", "ngram_sizes": (3, 0)}, "ngram_sizes must be two ints"),
    ({"proposer": "ngram", "ngram_sizes": 3}, "ngram_sizes must be two ints"),
    ({"proposer": "ngram", "ngram_sizes": (2.0, 1)}, "ngram_sizes must be two ints"),
    ({"proposer": "ngram", "draft_length_policy": "adaptive"}, "proposer='ngram' needs draft_length_policy='fixed'"),
])
def test_config_errors_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**changes)


def test_config_round_trip():
    config = SamplingConfig(proposer="ngram", ngram_sizes=[4, 2])
    assert config.ngram_sizes == (4, 2)
    assert config.to_dict()["ngram_sizes"] == [4, 2]
    assert SamplingConfig(**config.to_dict()) == config
