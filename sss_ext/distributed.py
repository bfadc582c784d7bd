"""Data-parallel generation over ``torch.distributed`` (launched by ``torchrun``), one result per prompt.

Every rank runs the batched loop (:func:`sss_ext.generate`) on its shard of the prompts
(prompt ``i`` of the job's list goes to rank ``i mod world_size``); after every batch the
ranks exchange a status (their records, or the error that stopped them) with one
``all_gather_object``, so rank 0 receives every result as it is made and every rank learns
at once when another one failed. A prompt's draws depend only on ``(seed, prompt index)``
(docs/algorithm.md §5), so its text does not depend on how the job was split.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) the same functions run in one
process, without a process group.

    from sss_ext.distributed import DistributedSession, generate_sharded
    with DistributedSession.from_env(device="cuda") as session:     # nccl on GPUs, gloo on CPU
        records = generate_sharded(session, target, draft, prompts, ref_model=ref, tokenizer=tok)
    # rank 0: one record per prompt, in input order; other ranks: []
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

from .decoding.stats import GenerationStats


class DistributedGenerationError(RuntimeError):
    """A rank failed; raised on every rank, naming the failing rank(s) and their prompts."""


@dataclass
class DistributedSession:
    """The process group of one job (or a single process).

    Attributes
    ----------
    rank, world_size, local_rank : int
        From torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (0, 1, 0 without it).
    device : torch.device
        This rank's device: ``cuda:<local_rank>`` for a CUDA job, else the device asked for.
    owns_group : bool
        Whether :meth:`from_env` created the process group (and :meth:`close` destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @classmethod
    def from_env(cls, device: str = "cpu", timeout_s: float = 1800.0) -> "DistributedSession":
        """Join the job torchrun started (or run alone when ``WORLD_SIZE`` is unset or 1).

        Parameters
        ----------
        device : str
            ``"cpu"`` (gloo backend) or ``"cuda"`` (nccl; each rank takes ``cuda:<LOCAL_RANK>``).
            A single process keeps the device as given (e.g. ``"cuda:1"``).
        timeout_s : float
            Seconds a collective waits for the other ranks before failing (a hung rank).

        Returns
        -------
        DistributedSession
        """
        if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not timeout_s > 0:
            raise ValueError(f"timeout_s must be a number > 0, got {timeout_s!r}")
        world_size = _env_int("WORLD_SIZE", 1)
        if world_size == 1:
            return cls(device=torch.device(device))
        rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        kind = torch.device(device).type
        if kind == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("device 'cuda' asked for, but CUDA is not available on this rank")
            local_device = torch.device("cuda", local_rank)
            torch.cuda.set_device(local_device)
            backend = "nccl"
        elif kind == "cpu":
            local_device, backend = torch.device("cpu"), "gloo"
        else:
            raise ValueError(f"device must be 'cpu' or 'cuda' under torchrun, got {device!r}")
        import torch.distributed as dist

        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, device=local_device, owns_group=owns)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes results and shows progress."""
        return self.rank == 0

    def all_gather(self, value) -> list:
        """``value`` of every rank, in rank order (any picklable object)."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Destroy the process group when this session created it."""
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {value!r}") from None


def shard_indices(indices: Sequence[int] | int, rank: int, world_size: int) -> list[int]:
    """The prompt indices rank ``rank`` runs: every ``world_size``-th one, starting at position ``rank``.

    Parameters
    ----------
    indices : int or sequence of int
        The job's prompt indices, or their number ``n`` for ``0 .. n-1``.
    rank, world_size : int
        ``0 <= rank < world_size``.

    Returns
    -------
    list of int
        Shards of all ranks are disjoint and together hold every index once.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if isinstance(indices, int) and not isinstance(indices, bool):
        if indices < 0:
            raise ValueError(f"indices must be a count >= 0 or a sequence of ints, got {indices}")
        indices = range(indices)
    return list(indices)[rank::world_size]


def prompt_records(output, prompt_indices: Sequence[int]) -> list[dict]:
    """One JSON-ready record per prompt of a :class:`~sss_ext.decoding.api.GenerateOutput`.

    Keys: ``index``, ``prompt_ids``, ``text``, ``token_ids``, ``method``, ``config``,
    ``seed``, ``stats`` (that prompt's counters) and, for sss / sss-paper, ``log_z``.
    """
    records = []
    for offset, index in enumerate(prompt_indices):
        record = {
            "index": int(index),
            "prompt_ids": output.prompt_ids[offset].tolist(),
            "text": output.texts[offset] if output.texts is not None else None,
            "token_ids": output.sequences[offset].tolist(),
            "method": output.method,
            "config": output.config.to_dict(),
            "seed": output.config.seed,
            "stats": output.stats.per_prompt[offset].to_dict(),
        }
        if output.log_z is not None:
            record["log_z"] = output.log_z[offset]
        records.append(record)
    return records


def gather_results(session: DistributedSession, records: list[dict], error: str | None = None) -> list[dict]:
    """Collect every rank's records on rank 0 (sorted by ``index``); raise on every rank if any rank failed.

    Parameters
    ----------
    session : DistributedSession
    records : list of dict
        This rank's records (each with an ``"index"``).
    error : str, optional
        This rank's failure, or None.

    Returns
    -------
    list of dict
        Rank 0: the records of all ranks, sorted by index; other ranks: ``[]``.

    Raises
    ------
    DistributedGenerationError
        On every rank when any rank passed an ``error``.
    """
    merged, errors = _exchange(session, records, error)
    if errors:
        raise DistributedGenerationError("; ".join(errors))
    return merged


def _exchange(session: DistributedSession, records: list[dict], error: str | None) -> tuple[list[dict], list[str]]:
    """(every rank's records sorted by index on rank 0, else []; every rank's error message)."""
    statuses = session.all_gather((records, error))
    errors = [message for _, message in statuses if message is not None]
    if not session.is_main:
        return [], errors
    return sorted((record for part, _ in statuses for record in part), key=lambda record: record["index"]), errors


def generate_sharded(session: DistributedSession, target, draft, prompts: Sequence, *, prompt_indices: Sequence[int] | None = None,
                     batch_size: int = 8, on_records: Callable[[list[dict]], None] | None = None, **generate_kwargs) -> list[dict]:
    """Generate for every prompt of a job, each rank on its shard, and gather the records on rank 0.

    Every rank must call it with the same ``prompts``, ``prompt_indices`` and arguments.

    Parameters
    ----------
    session : DistributedSession
        From :meth:`DistributedSession.from_env`; the models must live on ``session.device``.
    target, draft : transformers causal LMs
        As for :func:`sss_ext.generate`.
    prompts : sequence
        The job's prompts (str, or lists of token ids), as :func:`sss_ext.generate` takes them.
    prompt_indices : sequence of int, optional
        Global index of every prompt (default ``0 .. len(prompts)-1``); keys its randomness
        and its record's ``index``. A resumed job passes the indices still to do.
    batch_size : int
        Prompts per ``generate`` call on each rank.
    on_records : callable, optional
        Rank 0 only: called after every step with the records completed in it (any order).
    **generate_kwargs
        ``ref_model``, ``tokenizer``, ``method``, ``config``, ``reward_fn`` ... of :func:`sss_ext.generate`.

    Returns
    -------
    list of dict
        Rank 0: one :func:`prompt_records` record per prompt, sorted by index; other ranks: ``[]``.

    Raises
    ------
    DistributedGenerationError
        On every rank when a rank failed, naming the rank and the prompt indices of its batch
        (a single process raises the failure itself).
    """
    from .decoding.api import generate

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if prompt_indices is None:
        prompt_indices = list(range(len(prompts)))
    if len(prompt_indices) != len(prompts):
        raise ValueError(f"prompt_indices must hold one index per prompt ({len(prompts)}), got {len(prompt_indices)}")
    prompt_of_index = dict(zip((int(i) for i in prompt_indices), prompts))
    if len(prompt_of_index) != len(prompts):
        raise ValueError("prompt_indices must be distinct")
    mine = shard_indices(list(prompt_of_index), session.rank, session.world_size)
    steps = -(-len(prompts) // (batch_size * session.world_size))  # the same on every rank
    results = []
    for step in range(steps):
        batch = mine[step * batch_size:(step + 1) * batch_size]
        records, error = [], None
        if batch:
            try:
                output = generate(target, draft, [prompt_of_index[i] for i in batch], prompt_indices=batch, **generate_kwargs)
                records = prompt_records(output, batch)
            except Exception as failure:  # shared with every rank below, then raised everywhere
                if session.world_size == 1:
                    raise
                error = f"rank {session.rank} failed on prompt indices {batch}: {type(failure).__name__}: {failure}"
        gathered, errors = _exchange(session, records, error)
        if session.is_main:
            results.extend(gathered)
            if on_records is not None:
                on_records(gathered)  # the records of a failing step's other ranks are kept too
        if errors:
            raise DistributedGenerationError("; ".join(errors))
    results.sort(key=lambda record: record["index"])
    return results


def summed_stats(records: Sequence[dict]) -> dict:
    """Sum of the per-prompt counters of ``records`` (``wall_time`` summed too: compute seconds).

    Per-prompt call counts count a batched call once per prompt in it, so their sum is the
    number of (call, prompt) pairs, not the number of batched calls.
    """
    total: dict = {}
    for record in records:
        for name, value in record["stats"].items():
            if name in _COUNTERS:
                total[name] = total.get(name, 0) + value
    return total


#: the summable fields of GenerationStats (the importance-weight summaries of sss-sir are per prompt, not sums)
_COUNTERS = tuple(field.name for field in fields(GenerationStats) if field.default is not None)
