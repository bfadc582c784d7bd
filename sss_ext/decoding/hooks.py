"""Per-position hooks of :func:`sss_ext.generate`: logits processor, stopping criteria, streamer.

They follow the transformers contracts, so ``LogitsProcessorList`` / ``StoppingCriteriaList``
objects work unchanged:

* ``logits_processor(input_ids, scores) -> scores`` maps float32 next-token logits (N, V) given
  the prefixes ``input_ids`` (N, L). The loop applies it to the logits of **every model at every
  position with that position's own prefix**: at position ``i`` of a speculative round, the
  prefix is ``context + emitted tokens + x_0 .. x_{i-1}`` (docs/algorithm.md §1, "Logits
  processors"). It must depend on nothing but the prefix; the sampled law is then exactly the
  one of the processed models. A processor whose ``takes_prompt_index`` attribute is True is
  called as ``logits_processor(input_ids, scores, prompt_index)`` with the prompt index (N,) of
  every prefix, for per-prompt state (e.g. transformers' per-row padding lengths).
* ``stopping_criteria(input_ids, None) -> (N,) bool`` is evaluated on every prefix a row gains
  in a round; a row stops at the first one where it fires, and its later tokens of that round
  are cut (as EOS cuts them).
* ``streamer.put(tokens)`` receives the tokens of the one row as they are kept, shape (1, n);
  ``streamer.end()`` once at the end. Streaming needs a single row (as transformers' streamers).

``context`` is, per prompt, what precedes the generated tokens in ``input_ids``: the prompt
itself, or (:func:`sss_ext.hf.decode`) the left-padded row transformers' own ``generate`` would
show. Prefixes of equal length are processed in one call, so a batch costs one call per
distinct prefix length. Without hooks the loop calls none of this.
"""

from __future__ import annotations

import torch

__all__ = ["GenerationHooks"]


def _check_callable(name: str, value, contract: str) -> None:
    if value is not None and not callable(value):
        raise ValueError(f"{name} must be None or a callable {contract}, got {type(value).__name__}")


class GenerationHooks:
    """The hooks of one :func:`sss_ext.generate` call (built and checked by ``generate``).

    Parameters
    ----------
    prompts : list of torch.Tensor
        The encoded prompts, 1-D int64.
    vocab_size : int
        ``V``, the vocabulary size of the models.
    device : torch.device
    logits_processor : callable or None
        ``(input_ids (N, L) int64, scores (N, V) float32) -> (N, V)``.
    stopping_criteria : callable or None
        ``(input_ids (N, L) int64, None) -> (N,) bool`` (or one bool for all N).
    streamer : object or None
        With ``put(tokens)`` and ``end()``.
    context : list of torch.Tensor, optional
        Per prompt, the ids before the generated tokens; each must end with its prompt.
        Default: the prompts.

    Shape
    -----
    prompts, context: P tensors (L_p,), (C_p,) with C_p >= L_p
    """

    def __init__(self, prompts, vocab_size: int, device, logits_processor=None, stopping_criteria=None, streamer=None,
                 context=None):
        _check_callable("logits_processor", logits_processor, "(input_ids, scores) -> scores")
        _check_callable("stopping_criteria", stopping_criteria, "(input_ids, scores) -> (N,) bool tensor")
        if streamer is not None and not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
            raise ValueError(f"streamer must have put(tokens) and end() methods, got {type(streamer).__name__}")
        self.logits_processor = logits_processor
        self.stopping_criteria = stopping_criteria
        self.streamer = streamer
        context = list(prompts) if context is None else _check_context(context, prompts, vocab_size)
        lengths = [int(c.numel()) for c in context]
        self.context_lengths = torch.tensor(lengths, dtype=torch.int64, device=device)  # (P,)
        self.context = torch.zeros((len(context), max(lengths)), dtype=torch.int64, device=device)  # (P, C_max) left-aligned
        for index, ids in enumerate(context):
            self.context[index, : ids.numel()] = ids.to(device)

    def check_rows(self, num_rows: int) -> None:
        """``ValueError`` when a streamer is given and a run has more than one row."""
        if self.streamer is not None and num_rows > 1:
            raise ValueError(f"streamer needs a single generated sequence (batch size 1, one sample per prompt), "
                             f"got {num_rows} rows (transformers' streamers take batch size 1 as well)")

    def _sequences(self, book, extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every active row's ``context + generated + extra``, left-aligned.

        Shape
        -----
        extra: (B, D) -> sequences (B, C_max + N_max + D), base lengths (B,) = C + N
        """
        rows = book.active
        prompts = book.prompt_of_row[rows]
        context_lengths = self.context_lengths[prompts]
        generated = book.num_generated[rows]
        num_generated = int(generated.max()) if rows.numel() else 0
        width_context, width_extra = self.context.shape[1], extra.shape[1]
        source = torch.cat([self.context[prompts], book.tokens[rows, :num_generated], extra], dim=1)
        columns = torch.arange(width_context + num_generated + width_extra, device=source.device)[None]
        in_generated = columns - context_lengths[:, None]
        in_extra = in_generated - generated[:, None]
        index = torch.where(columns < context_lengths[:, None], columns,
                            torch.where(in_extra < 0, width_context + in_generated, width_context + num_generated + in_extra))
        index = index.clamp(0, source.shape[1] - 1)  # columns past a row's end: never read
        return source.gather(1, index), context_lengths + generated

    @staticmethod
    def _by_length(sequences: torch.Tensor, lengths: torch.Tensor, valid: torch.Tensor):
        """Yield (rows, positions, input_ids) for every distinct prefix length of the valid cells.

        Shape
        -----
        sequences: (B, S); lengths, valid: (B, W) -> rows, positions: (N,), input_ids: (N, length)
        """
        for length in torch.unique(lengths[valid]).tolist():
            rows, positions = torch.nonzero(valid & (lengths == length), as_tuple=True)
            yield rows, positions, sequences[rows, :length]

    def process(self, book, drafts: list[torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        """Apply the logits processor at the last ``W`` positions of the drafted block.

        Position ``w`` sees ``context + generated + drafts[:D - W + 1 + w]``: a draft step
        (``W = 1``) sees every draft so far, a verification block (``W = D + 1``) sees
        ``x_0 .. x_{w-1}`` at position ``w``.

        Shape
        -----
        drafts: D tensors (B,); logits: (B, W, V) -> (B, W, V) float32
        """
        batch, width, vocab_size = logits.shape
        extra = torch.stack(drafts, dim=1) if drafts else torch.zeros((batch, 0), dtype=torch.int64, device=logits.device)
        sequences, base = self._sequences(book, extra)
        first = extra.shape[1] - width + 1
        lengths = base[:, None] + first + torch.arange(width, device=logits.device)[None]
        scores = logits.float()
        out = torch.empty_like(scores)
        valid = torch.ones((batch, width), dtype=torch.bool, device=logits.device)
        per_prompt = getattr(self.logits_processor, "takes_prompt_index", False)
        prompt_of_row = book.prompt_of_row[book.active]
        for rows, positions, input_ids in self._by_length(sequences, lengths, valid):
            if per_prompt:
                processed = self.logits_processor(input_ids, scores[rows, positions], prompt_of_row[rows])
            else:
                processed = self.logits_processor(input_ids, scores[rows, positions])
            if not isinstance(processed, torch.Tensor) or tuple(processed.shape) != (rows.numel(), vocab_size):
                raise ValueError(f"logits_processor must return scores of shape {(rows.numel(), vocab_size)}, "
                                 f"got {getattr(processed, 'shape', type(processed).__name__)}")
            out[rows, positions] = processed.to(out.dtype)
        if bool(torch.isnan(out).any() | (out == torch.inf).any()):
            raise ValueError("logits_processor returned NaN or +inf scores; processed logits must be finite or -inf")
        if bool((out == -torch.inf).all(dim=-1).any()):
            raise ValueError("logits_processor masked every token (all scores -inf) at some position")
        return out

    def stop(self, book, new: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cut each row's ``count`` new tokens after the first prefix where a stopping criterion fires.

        Shape
        -----
        new: (B, W); count: (B,) -> count (B,), stopped (B,) bool
        """
        batch, width = new.shape
        stopped = torch.zeros(batch, dtype=torch.bool, device=new.device)
        if self.stopping_criteria is None or width == 0:
            return count, stopped
        sequences, base = self._sequences(book, new)
        steps = torch.arange(1, width + 1, device=new.device)[None]
        fired = torch.zeros((batch, width), dtype=torch.bool, device=new.device)
        for rows, positions, input_ids in self._by_length(sequences, base[:, None] + steps, steps <= count[:, None]):
            done = torch.as_tensor(self.stopping_criteria(input_ids, None), device=new.device)
            if done.dtype != torch.bool or done.dim() > 1 or (done.dim() == 1 and done.numel() != rows.numel()):
                raise ValueError(f"stopping_criteria must return a bool tensor of shape ({rows.numel()},), "
                                 f"got {done.dtype} of shape {tuple(done.shape)}")
            fired[rows, positions] = done.expand(rows.numel())
        stopped = fired.any(dim=1)
        first = torch.argmax(fired.to(torch.int8), dim=1) + 1
        return torch.where(stopped, first, count), stopped

    def stream(self, new: torch.Tensor, count: torch.Tensor) -> None:
        """Hand the kept tokens of the one row to the streamer. Shape: new (1, W), count (1,)"""
        if self.streamer is None or new.shape[0] == 0:
            return
        kept = int(count[0])
        if kept > 0:
            self.streamer.put(new[:1, :kept].cpu())

    def end(self) -> None:
        if self.streamer is not None:
            self.streamer.end()


def _check_context(context, prompts, vocab_size: int) -> list[torch.Tensor]:
    if not isinstance(context, (list, tuple)) or len(context) != len(prompts):
        raise ValueError(f"context_ids must be a list of {len(prompts)} 1-D token-id tensors (one per prompt), "
                         f"got {type(context).__name__} of length {len(context) if hasattr(context, '__len__') else '?'}")
    checked = []
    for index, (ids, prompt) in enumerate(zip(context, prompts)):
        ids = torch.as_tensor(ids)
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"context_ids[{index}] must be a 1-D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
        ids = ids.to(dtype=torch.int64, device="cpu")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"context_ids[{index}] must hold token ids in [0, {vocab_size})")
        length = prompt.numel()
        if ids.numel() < length or not torch.equal(ids[ids.numel() - length:], prompt):
            raise ValueError(f"context_ids[{index}] must end with prompt {index} (the ids before the generated tokens)")
        checked.append(ids)
    return checked
