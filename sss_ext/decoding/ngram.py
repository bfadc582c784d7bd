"""Prompt-lookup (n-gram) proposals: drafts copied from earlier in each row's own history.

For every row, the last ``n`` tokens of its history (prompt + generated tokens) are looked
up among the row's earlier tokens, for ``n`` from the largest of ``ngram_sizes`` down to the
smallest; the first ``n`` with a match wins and the **most recent** earlier occurrence of
that n-gram is used. The proposal is the ``K`` tokens that followed it, none when no n-gram
of any size matches. When the match is so recent that its continuation reaches the end of
the history (e.g. a token repeated over and over), the continuation goes on with the
match's period ``p`` (the distance from the match to the suffix): the token proposed for
position ``t`` past the end is the one at ``t - p``, as if the history kept repeating.

The proposer is a deterministic function of each row's own history, so a row's proposals
do not depend on the other rows of the batch. It has no draft distribution: the loop
verifies its tokens as one-hot drafts (``sss_ext.verify(target_logits, None, draft_tokens,
...)``), whose acceptance probability is the target law of the drafted token.

The search is vectorised over the batch: one comparison of every window of the padded
histories with each row's suffix per n-gram size.
"""

from __future__ import annotations

import torch

__all__ = ["propose_ngrams", "histories"]


def propose_ngrams(history: torch.Tensor, lengths: torch.Tensor, num_tokens: torch.Tensor | int,
                   ngram_sizes: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``num_tokens`` drafts per row copied from after the most recent earlier match of its suffix.

    Parameters
    ----------
    history : torch.Tensor
        int64 token ids, each row's history left-aligned: row ``b`` holds its tokens in
        columns ``0 .. lengths[b] - 1``; later columns are ignored.
    lengths : torch.Tensor
        int64 tokens of history per row (``0 <= lengths[b] <= H``).
    num_tokens : torch.Tensor or int
        The most drafts each row may receive (``>= 0``); an int applies to every row.
    ngram_sizes : (int, int)
        ``(largest n, smallest n)``, ``largest >= smallest >= 1``: the suffix lengths tried,
        longest first.

    Returns
    -------
    drafts : torch.Tensor
        int64 proposals; row ``b`` holds ``counts[b]`` real drafts, then copies of its last
        real draft (or of its last history token when it has none), which callers ignore.
    counts : torch.Tensor
        int64 number of drafts proposed per row: ``num_tokens`` where an n-gram matched, else 0.

    Shape
    -----
    history: (B, H); lengths: (B,); num_tokens: (B,) or int -> drafts (B, max(counts)), counts (B,)
    """
    largest, smallest = ngram_sizes
    if not 1 <= smallest <= largest:
        raise ValueError(f"ngram_sizes must be (largest, smallest) with largest >= smallest >= 1, got {ngram_sizes!r}")
    batch, width = history.shape
    device = history.device
    lengths = lengths.to(device=device, dtype=torch.int64)
    limit = torch.as_tensor(num_tokens, dtype=torch.int64, device=device).expand(batch)
    rows = torch.arange(batch, device=device)
    # start of the chosen match (-1: none yet) and the n it matched with
    start = torch.full((batch,), -1, dtype=torch.int64, device=device)
    size = torch.zeros(batch, dtype=torch.int64, device=device)
    for n in range(largest, smallest - 1, -1):
        if width < n + 1:
            continue
        suffix_columns = (lengths[:, None] - n + torch.arange(n, device=device)[None]).clamp(min=0)
        suffix = history.gather(1, suffix_columns)  # (B, n)
        windows = history.unfold(1, n, 1)  # (B, H - n + 1, n): window j covers columns j .. j + n - 1
        starts = torch.arange(windows.shape[1], device=device)[None]
        # an earlier occurrence: it ends before the suffix's last token, so at least one token follows it
        earlier = starts + n <= lengths[:, None] - 1
        matches = (windows == suffix[:, None, :]).all(dim=2) & earlier & (lengths[:, None] >= n + 1)
        found = matches.any(dim=1)
        latest = torch.where(matches, starts, -1).amax(dim=1)
        take = found & (start < 0)
        start = torch.where(take, latest, start)
        size = torch.where(take, torch.full_like(size, n), size)
    first = start + size  # column of the first proposed token
    period = (lengths - first).clamp(min=1)  # the suffix starts `period` columns after the match
    counts = torch.where(start >= 0, limit.clamp(min=0), torch.zeros_like(lengths))
    most = int(counts.max()) if batch else 0
    columns = first[:, None] + torch.minimum(torch.arange(most, device=device)[None], (counts - 1).clamp(min=0)[:, None])
    past_end = columns - lengths[:, None]  # >= 0: past the history, repeat with the period
    columns = torch.where(past_end >= 0, lengths[:, None] - period[:, None] + past_end % period[:, None], columns)
    columns = torch.where(counts[:, None] > 0, columns, (lengths - 1).clamp(min=0)[:, None])
    drafts = history[rows[:, None], columns.clamp(0, max(width - 1, 0))] if most else history.new_zeros((batch, 0))
    return drafts, counts


def histories(prompts: torch.Tensor, prompt_lengths: torch.Tensor, generated: torch.Tensor,
              num_generated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's prompt followed by its generated tokens, left-aligned.

    Parameters
    ----------
    prompts : torch.Tensor
        int64 prompts, left-aligned (row ``b`` in columns ``0 .. prompt_lengths[b] - 1``).
    prompt_lengths : torch.Tensor
        int64 prompt length per row.
    generated : torch.Tensor
        int64 generated tokens, left-aligned (row ``b`` in columns ``0 .. num_generated[b] - 1``).
    num_generated : torch.Tensor
        int64 generated tokens per row.

    Returns
    -------
    history : torch.Tensor
        int64; row ``b``'s prompt then its generated tokens, the rest of the row unspecified.
    lengths : torch.Tensor
        ``prompt_lengths + num_generated``.

    Shape
    -----
    prompts: (B, P); prompt_lengths, num_generated: (B,); generated: (B, N) -> history (B, P + N), lengths (B,)
    """
    width_prompt = prompts.shape[1]
    source = torch.cat([prompts, generated], dim=1)
    columns = torch.arange(source.shape[1], device=source.device)[None]
    in_generated = columns - prompt_lengths[:, None]
    index = torch.where(in_generated < 0, columns, width_prompt + in_generated).clamp(max=source.shape[1] - 1)
    return source.gather(1, index), prompt_lengths + num_generated
