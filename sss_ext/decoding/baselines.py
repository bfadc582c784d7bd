"""Reward-guided baselines of docs/algorithm.md §9, on the same batched sampler and accounting.

* **Best-of-N**: N target samples per prompt, return the one ``reward_fn`` scores highest
  (ties: the lowest sample index).
* **Speculative Rejection** (Sun et al., NeurIPS 2024): start N target samples per prompt;
  every ``rejection_interval`` (m) tokens score the unfinished (partial) responses and stop
  the lowest ``floor(rejection_rate * n)`` of the ``n`` unfinished ones of each prompt;
  continue the survivors; return the finished response with the highest reward. With
  ``rejection_rate = 0`` nothing is ever dropped (and no partial response is scored), so the
  run is Best-of-N sample for sample.
* **Soft best-of-n with a small proposer** (GSI, Geuter et al. 2025): n samples from the
  draft ``r``; scores ``beta * reward + log q(y) - log r(y)`` where both log-densities are of
  the warped (tempered / truncated) sampling distributions, ``log r`` accumulated while
  sampling and ``log q`` from one batched target forward over all candidates; the answer
  is drawn with probability ``softmax(scores)``. If the chosen score is below
  ``soft_bon_threshold`` (or every score is ``-inf``), soft best-of-n on the target: n
  target samples, drawn with probability ``softmax(beta * reward)``.
"""

from __future__ import annotations

import torch

from ..warp import warp_probs
from .autoregressive import AutoregressiveRun
from .context import MethodResult, RunContext
from .randomness import CHOICE, FALLBACK, FALLBACK_CHOICE
from .rows import left_pad, repeat_prompts


def _full(prompts: list[torch.Tensor], rows: list[int], sequences: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.cat([prompts[row], sequences[row]]) for row in rows]


def best_of_n(ctx: RunContext) -> MethodResult:
    prompts, config, stats, scorer = ctx.prompts, ctx.config, ctx.stats, ctx.scorer
    n = config.num_samples
    rows, prompt_of_row, sample_of_row = repeat_prompts(prompts, n)
    run = AutoregressiveRun(ctx, "target", rows, prompt_of_row, sample_of_row=sample_of_row)
    run.run()
    candidates = run.book.sequences()
    rewards = scorer(_full(rows, list(range(len(rows))), candidates), prompt_of_row)
    stats.prompts_finished(range(len(prompts)))
    result = MethodResult(sequences=[])
    for prompt in range(len(prompts)):
        group = list(range(prompt * n, (prompt + 1) * n))
        chosen = group[int(torch.argmax(rewards[group]))]
        result.sequences.append(candidates[chosen])
        result.extras.append({"candidates": [candidates[i] for i in group], "rewards": rewards[group].tolist(),
                              "chosen": chosen - group[0]})
    return result


def speculative_rejection(ctx: RunContext) -> MethodResult:
    prompts, config, stats, scorer = ctx.prompts, ctx.config, ctx.stats, ctx.scorer
    n = config.num_samples
    rows, prompt_of_row, sample_of_row = repeat_prompts(prompts, n)
    run = AutoregressiveRun(ctx, "target", rows, prompt_of_row, sample_of_row=sample_of_row)
    decisions: list[list[dict]] = [[] for _ in prompts]
    generated = 0
    while run.book.num_active:
        run.run(max_rounds=config.rejection_interval)
        generated += config.rejection_interval
        if not run.book.num_active:
            break
        active = run.book.active.cpu()
        active_prompts = prompt_of_row[active]
        unfinished = torch.bincount(active_prompts, minlength=len(prompts))
        drop_counts = torch.floor(config.rejection_rate * unfinished.double()).to(torch.int64)
        if int(drop_counts.sum()) == 0:
            continue  # nothing would be dropped: do not spend reward calls
        scored = active[drop_counts[active_prompts] > 0]
        sequences = run.book.sequences()
        scores = scorer(_full(rows, scored.tolist(), sequences), prompt_of_row[scored])
        dropped = []
        for prompt in torch.nonzero(drop_counts).squeeze(1).tolist():
            in_group = prompt_of_row[scored] == prompt
            group_rows, group_scores = scored[in_group], scores[in_group]
            order = torch.argsort(group_scores, stable=True)
            lose = group_rows[order[: int(drop_counts[prompt])]]
            dropped.append(lose)
            decisions[prompt].append({"tokens": generated, "rows": (group_rows - prompt * n).tolist(),
                                      "scores": group_scores.tolist(), "dropped": (lose - prompt * n).tolist()})
        run.drop(torch.cat(dropped))
    finished = torch.nonzero(run.book.finished.cpu()).squeeze(1)
    candidates = run.book.sequences()
    rewards = scorer(_full(rows, finished.tolist(), candidates), prompt_of_row[finished])
    stats.prompts_finished(range(len(prompts)))
    result = MethodResult(sequences=[])
    for prompt in range(len(prompts)):
        in_group = prompt_of_row[finished] == prompt
        group_rows, group_rewards = finished[in_group], rewards[in_group]
        chosen = int(group_rows[int(torch.argmax(group_rewards))])
        result.sequences.append(candidates[chosen])
        result.extras.append({"candidates": [candidates[i] for i in group_rows.tolist()], "finished": (group_rows - prompt * n).tolist(),
                              "rewards": group_rewards.tolist(), "chosen": chosen - prompt * n, "decisions": decisions[prompt]})
    return result


def _softmax_pick(scores: torch.Tensor, uniform: float) -> int:
    """Index drawn with probability softmax(scores) by inverse CDF; -1 if every score is -inf."""
    if not bool(torch.isfinite(scores).any()):
        return -1
    probs = torch.softmax(scores, dim=0)
    cumulative = torch.cumsum(probs, dim=0)
    above = torch.nonzero(cumulative > uniform * cumulative[-1])
    return int(above[0]) if above.numel() else int(torch.nonzero(probs > 0)[-1])


@torch.no_grad()
def target_log_prob(ctx: RunContext, full_sequences, response_lengths, prompt_of_row) -> torch.Tensor:
    """``log warp(q)(response)`` of every candidate with one batched target forward (no cache).

    Shape
    -----
    full_sequences: R tensors (L_r + T_r,); response_lengths: R ints -> (R,) float64
    """
    models, config, clock = ctx.models, ctx.config, ctx.monitor.clock
    ids, mask = left_pad(full_sequences, models.pad_token_id, models.device)
    positions = (torch.cumsum(mask, dim=1) - 1).clamp_min(0)
    width = ids.shape[1]
    start = clock() if clock is not None else None
    logits = models.target(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    ctx.monitor.scoring_pass("target", len(full_sequences), prompt_of_row, width, clock() - start if start is not None else None,
                             logits={"target": logits})
    out = torch.zeros(len(full_sequences), dtype=torch.float64)
    for row, length in enumerate(response_lengths):
        if length == 0:
            continue
        probs = warp_probs(logits[row, width - length - 1: width - 1], config.temperature, config.top_k, config.top_p,
                           top_k_ties=config.top_k_ties)
        chosen = probs.gather(1, ids[row, width - length:, None]).squeeze(1)
        out[row] = torch.log(chosen).sum().cpu()
    return out


def soft_best_of_n(ctx: RunContext) -> MethodResult:
    prompts, config, stats, scorer = ctx.prompts, ctx.config, ctx.stats, ctx.scorer
    n = config.num_samples
    rows, prompt_of_row, sample_of_row = repeat_prompts(prompts, n)
    run = AutoregressiveRun(ctx, "draft", rows, prompt_of_row, track_log_prob=True, sample_of_row=sample_of_row)
    run.run()
    candidates = run.book.sequences()
    full = _full(rows, list(range(len(rows))), candidates)
    log_r = run.log_prob.cpu()
    log_q = target_log_prob(ctx, full, [c.numel() for c in candidates], prompt_of_row)
    rewards = scorer(full, prompt_of_row)
    scores = config.beta * rewards + log_q - log_r
    uniforms = ctx.randomness.one_each(torch.arange(len(prompts)), CHOICE).cpu().tolist()
    result = MethodResult(sequences=[])
    fallback = []
    for prompt in range(len(prompts)):
        group = slice(prompt * n, (prompt + 1) * n)
        chosen = _softmax_pick(scores[group], uniforms[prompt])
        extra = {"candidates": candidates[group], "rewards": rewards[group].tolist(), "log_q": log_q[group].tolist(),
                 "log_r": log_r[group].tolist(), "scores": scores[group].tolist(), "chosen": chosen, "fallback": False}
        below = config.soft_bon_threshold is not None and chosen >= 0 and float(scores[group][chosen]) < config.soft_bon_threshold
        if chosen < 0 or below:
            fallback.append(prompt)
            extra["fallback"] = True
            result.sequences.append(None)
        else:
            result.sequences.append(candidates[prompt * n + chosen])
        result.extras.append(extra)
    stats.prompts_finished(p for p in range(len(prompts)) if p not in fallback)
    if fallback:
        fallback_prompts = [prompts[p] for p in fallback]
        target_rows, local_of_row, target_sample_of_row = repeat_prompts(fallback_prompts, n)
        target_prompt_of_row = torch.tensor(fallback)[local_of_row]
        target_run = AutoregressiveRun(ctx, "target", target_rows, target_prompt_of_row, sample_of_row=target_sample_of_row,
                                       purpose=FALLBACK)
        target_run.run()
        target_candidates = target_run.book.sequences()
        target_rewards = scorer(_full(target_rows, list(range(len(target_rows))), target_candidates), target_prompt_of_row)
        target_uniforms = ctx.randomness.one_each(torch.tensor(fallback), FALLBACK_CHOICE).cpu().tolist()
        for local, prompt in enumerate(fallback):
            group = slice(local * n, (local + 1) * n)
            chosen = _softmax_pick(config.beta * target_rewards[group], target_uniforms[local])
            result.sequences[prompt] = target_candidates[local * n + chosen]
            result.extras[prompt].update({"fallback_candidates": target_candidates[group],
                                          "fallback_rewards": target_rewards[group].tolist(), "fallback_chosen": chosen})
        stats.prompts_finished(fallback)
    return result
