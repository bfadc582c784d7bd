"""Command line: ``python -m sss_ext generate ...``.

Models, tokenizers and reward models load from local directories only
(``local_files_only=True``: nothing is fetched from a hub at run time).

Prompts file: JSON Lines, one object per prompt with ``"prompt"`` (text, needs a tokenizer)
or ``"input_ids"`` (list of ints), and optionally ``"id"``. Output: one JSON object per
prompt, in input order, with ``index``, ``id``, ``prompt``, ``prompt_ids``, ``text``,
``token_ids``, ``method``, ``config``, ``seed``, ``stats`` (that prompt's counters) and,
for sss / sss-paper, ``log_z``. Prompts are generated ``--batch-size`` at a time; batch
``j`` (0-based, starting at prompt ``j * batch_size``) uses seed ``--seed + j``, recorded.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from .decoding.config import SamplingConfig
from .decoding.methods import METHODS

_DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sss_ext", description="Reward-Shifted Speculative Sampling (sss_ext).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = commands.add_parser(
        "generate",
        help="generate continuations of a JSONL file of prompts",
        description="Generate one continuation per prompt with SSS, speculative sampling or a baseline; "
                    "write one JSON record per prompt. Models load from local directories only.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    models = gen.add_argument_group("models (local directories written by save_pretrained)")
    models.add_argument("--target", metavar="DIR", help="target model q (needed by every method except draft)")
    models.add_argument("--draft", metavar="DIR", help="aligned draft r (sss, sss-paper, sd, draft, soft-bon)")
    models.add_argument("--ref", metavar="DIR", help="reference draft d that r was aligned from (sss, sss-paper)")
    models.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the target's, else the draft's); "
                        "optional when every prompt gives input_ids")
    models.add_argument("--reward", metavar="DIR", help="transformers sequence-classification reward model (bon, spec-rejection, soft-bon)")
    models.add_argument("--reward-fn", metavar="MODULE:FUNCTION", help="Python reward callable instead of --reward: "
                        "called with a list of texts (or id lists, see --reward-input), returns one score each")
    models.add_argument("--device", default="cpu", help="torch device for all models")
    models.add_argument("--dtype", default="float32", choices=_DTYPES, help="parameter dtype of all models")

    io = gen.add_argument_group("input / output")
    io.add_argument("--prompts", required=True, metavar="FILE", help='JSONL prompts: {"prompt": str} or {"input_ids": [int, ...]}, optional "id"')
    io.add_argument("--out", required=True, metavar="FILE", help="JSONL results, one record per prompt")
    io.add_argument("--batch-size", type=int, default=8, help="prompts per batched generate call")
    io.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bar")

    sampling = gen.add_argument_group("sampling (see sss_ext.SamplingConfig)")
    defaults = SamplingConfig()
    sampling.add_argument("--method", default="sss", choices=tuple(METHODS), help="decoding method")
    sampling.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="tokens generated per prompt at most")
    sampling.add_argument("--num-draft-tokens", type=int, default=defaults.num_draft_tokens, help="K, draft tokens per speculative round")
    sampling.add_argument("--temperature", type=float, default=defaults.temperature, help="sampling temperature; 0 is greedy")
    sampling.add_argument("--top-k", type=int, default=defaults.top_k, help="keep the k most likely tokens; 0 disables")
    sampling.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus mass; 1 disables")
    sampling.add_argument("--shift", type=float, default=defaults.shift, help="lambda, strength of the reward shift (r/d)^lambda")
    sampling.add_argument("--seed", type=int, default=defaults.seed, help="seed of batch 0 (batch j uses seed + j)")
    sampling.add_argument("--num-samples", type=int, default=defaults.num_samples, help="N of bon / spec-rejection, n of soft-bon")
    sampling.add_argument("--num-candidates", type=int, default=defaults.num_candidates,
                          help="N of sss-sir: SSS candidates per prompt, one resampled by its weight prod Z")
    sampling.add_argument("--rejection-interval", type=int, default=defaults.rejection_interval, help="m: spec-rejection decides every m tokens")
    sampling.add_argument("--rejection-rate", type=float, default=defaults.rejection_rate, help="alpha: fraction of partial responses spec-rejection drops")
    sampling.add_argument("--beta", type=float, default=defaults.beta, help="soft-bon weight of the reward")
    sampling.add_argument("--soft-bon-threshold", type=float, default=None, help="soft-bon falls back to the target below this score; unset never")
    sampling.add_argument("--eos-token-id", type=int, action="append", default=None, metavar="ID",
                          help="end-of-sequence id (repeatable); default: the tokenizer's or the target's")
    sampling.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens")
    sampling.add_argument("--pad-token-id", type=int, default=None, help="id fed in padded slots; default: the tokenizer's, else 0")
    sampling.add_argument("--reward-input", default=defaults.reward_input, choices=("auto", "text", "ids"),
                          help="what --reward-fn receives: texts or token-id lists of prompt + response")
    return parser


def _check_dir(flag: str, path: str | None) -> None:
    if path is not None and not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is not a local directory (models load with local_files_only=True)")


def _load_model(path: str | None, device: str, dtype: str, classification: bool = False):
    if path is None:
        return None
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if classification else AutoModelForCausalLM
    model = cls.from_pretrained(path, local_files_only=True, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def _load_tokenizer(path: str | None):
    if path is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        return None


def _load_callable(spec: str):
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--reward-fn must look like MODULE:FUNCTION, got {spec!r}")
    sys.path.insert(0, os.getcwd())
    function = getattr(importlib.import_module(module_name), attribute)
    if not callable(function):
        raise ValueError(f"--reward-fn {spec!r} is not callable")
    return function


def read_prompts(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise ValueError(f"--prompts {path!r} does not exist")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"--prompts line {number} is not JSON: {error}") from None
            if isinstance(record, str):
                record = {"prompt": record}
            if not isinstance(record, dict) or not ("prompt" in record or "input_ids" in record):
                raise ValueError(f'--prompts line {number} needs "prompt" or "input_ids"')
            records.append(record)
    if not records:
        raise ValueError(f"--prompts {path!r} holds no prompts")
    return records


def run_generate(args) -> int:
    from tqdm import tqdm

    from .decoding.api import generate

    for flag, path in (("--target", args.target), ("--draft", args.draft), ("--ref", args.ref),
                       ("--tokenizer", args.tokenizer), ("--reward", args.reward)):
        _check_dir(flag, path)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.reward is not None and args.reward_fn is not None:
        raise ValueError("give either --reward or --reward-fn, not both")
    config = SamplingConfig(
        max_new_tokens=args.max_new_tokens, num_draft_tokens=args.num_draft_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, shift=args.shift, seed=args.seed, num_samples=args.num_samples,
        num_candidates=args.num_candidates,
        rejection_interval=args.rejection_interval, rejection_rate=args.rejection_rate, beta=args.beta,
        soft_bon_threshold=args.soft_bon_threshold,
        eos_token_id=tuple(args.eos_token_id) if args.eos_token_id else None, ignore_eos=args.ignore_eos,
        pad_token_id=args.pad_token_id, reward_input=args.reward_input,
    )
    records = read_prompts(args.prompts)
    tokenizer = _load_tokenizer(args.tokenizer or args.target or args.draft)
    if args.tokenizer is not None and tokenizer is None:
        raise ValueError(f"--tokenizer {args.tokenizer!r} holds no loadable tokenizer")
    target = _load_model(args.target, args.device, args.dtype)
    draft = _load_model(args.draft, args.device, args.dtype)
    ref = _load_model(args.ref, args.device, args.dtype)
    reward_fn = _load_model(args.reward, args.device, args.dtype, classification=True)
    if args.reward_fn is not None:
        reward_fn = _load_callable(args.reward_fn)

    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    progress = tqdm(total=len(records), desc=f"{args.method}", unit="prompt", disable=args.no_progress, file=sys.stderr)
    with open(args.out, "w", encoding="utf-8") as handle:
        for batch_index, start in enumerate(range(0, len(records), args.batch_size)):
            batch = records[start:start + args.batch_size]
            prompts = [r["prompt"] if "prompt" in r else [int(t) for t in r["input_ids"]] for r in batch]
            seed = args.seed + batch_index
            output = generate(target, draft, prompts, ref_model=ref, tokenizer=tokenizer, method=args.method,
                              config=config.replace(seed=seed), reward_fn=reward_fn)
            for offset, record in enumerate(batch):
                tokens = output.sequences[offset].tolist()
                result = {
                    "index": start + offset,
                    "id": record.get("id"),
                    "prompt": record.get("prompt"),
                    "prompt_ids": output.prompt_ids[offset].tolist(),
                    "text": output.texts[offset] if output.texts is not None else None,
                    "token_ids": tokens,
                    "method": args.method,
                    "config": output.config.to_dict(),
                    "seed": seed,
                    "stats": output.stats.per_prompt[offset].to_dict(),
                }
                if output.log_z is not None:
                    result["log_z"] = output.log_z[offset]
                handle.write(json.dumps(result) + "\n")
            handle.flush()
            progress.update(len(batch))
    progress.close()
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return run_generate(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    parser.print_help()
    return 1
