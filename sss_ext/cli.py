"""Command line: ``python -m sss_ext generate ...``.

Models: with no model path the embedded default models of :mod:`sss_ext.models` run (target
SmolLM2-135M-Instruct ``q``, distilled reference draft ``d``, DPO-aligned draft ``r``, their
tokenizer); ``--target`` / ``--draft`` / ``--ref`` / ``--tokenizer`` replace one role each
with a local directory written by ``save_pretrained``. Everything loads from local files only
(``local_files_only=True``: nothing is fetched from a hub at run time).

Every argument is checked before anything loads (paths, the prompts file, the output path,
the sampling settings through :class:`~sss_ext.SamplingConfig`, the reward a method needs);
an error names the flag and exits with status 2, without a traceback. After the models load,
the models and prompts are checked together before the progress bar starts.

Prompts file: JSON Lines, one object per prompt with ``"prompt"`` (text, needs a tokenizer)
or ``"input_ids"`` (list of ints), and optionally ``"id"``. Output: one JSON object per
prompt, in input order, with ``index``, ``id``, ``prompt``, ``prompt_ids``, ``text``,
``token_ids``, ``method``, ``config``, ``seed``, ``stats`` (that prompt's counters) and,
for sss / sss-paper, ``log_z``. Prompts are generated ``--batch-size`` at a time; a prompt's
draws derive from ``(--seed, its index in the file)``, so its text does not depend on the
batch size or on how a ``torchrun`` job splits the file (docs/algorithm.md §5).

Under ``torchrun --nproc-per-node N -m sss_ext generate ...`` every rank generates its shard
(:mod:`sss_ext.distributed`) and rank 0 writes the one output file. Records are appended to
``<out>.partial`` as they complete; the finished file is written to ``<out>.tmp`` and renamed
to ``<out>``. ``--resume`` skips the prompts already in ``<out>`` or ``<out>.partial``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import sys

from .checks import TOP_K_TIES
from .decoding.config import DRAFT_LENGTH_POLICIES, PROPOSERS, VERIFICATIONS, SamplingConfig
from .decoding.methods import METHODS, get_method
from .decoding.roles import BY_ARGUMENT, ROLES
from .distributed import DistributedGenerationError, DistributedSession, generate_sharded

_DTYPES = ("float32", "bfloat16", "float16")
#: generate() model argument -> the flag that gives its directory (the role table: sss_ext.decoding.roles)
ROLE_FLAGS = {role.argument: role.flag for role in ROLES}
_PROXY_REWARD_FN = "sss_ext.models.rewards:proxy_reward"


def build_parser() -> argparse.ArgumentParser:
    """Every command and flag of ``python -m sss_ext`` (the one place arguments are defined)."""
    parser = argparse.ArgumentParser(prog="python -m sss_ext", description="Reward-Shifted Speculative Sampling (sss_ext).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    gen = commands.add_parser(
        "generate",
        help="generate continuations of a JSONL file of prompts",
        description="Generate one continuation per prompt with SSS, speculative sampling or a baseline; "
                    "write one JSON record per prompt. With no model path the embedded default models run "
                    "(sss_ext.models: target SmolLM2-135M-Instruct q, distilled reference draft d, DPO-aligned "
                    "draft r); a path replaces that role with a local save_pretrained directory. Arguments are "
                    "checked before anything loads; an error names the flag and exits with status 2.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    models = gen.add_argument_group(
        "models (default: the embedded models of sss_ext.models; a path overrides that role with a local "
        "directory written by save_pretrained)")
    models.add_argument("--target", metavar="DIR", help="target model q (every method except draft); "
                        "default: SmolLM2-135M-Instruct")
    models.add_argument("--draft", metavar="DIR", help="aligned draft r (sss, sss-paper, sd, draft, soft-bon); "
                        "default: the embedded DPO-aligned draft")
    models.add_argument("--ref", metavar="DIR", help="reference draft d that r was aligned from (sss, sss-paper); "
                        "default: the embedded distilled draft")
    models.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the target's, else the "
                        "draft's; the embedded models' when they run); optional when every prompt gives input_ids")
    models.add_argument("--reward", metavar="DIR", help="transformers sequence-classification reward model (bon, spec-rejection, soft-bon)")
    models.add_argument("--reward-fn", metavar="MODULE:FUNCTION", help="Python reward callable instead of --reward: "
                        "called with a list of texts (or id lists, see --reward-input), returns one score each; "
                        f"the embedded models' proxy reward (VADER) is {_PROXY_REWARD_FN}")
    models.add_argument("--device", default="cpu", help="torch device for all models")
    models.add_argument("--dtype", default="float32", choices=_DTYPES, help="parameter dtype of all models")

    io = gen.add_argument_group("input / output")
    io.add_argument("--prompts", required=True, metavar="FILE", help='JSONL prompts: {"prompt": str} or {"input_ids": [int, ...]}, optional "id"')
    io.add_argument("--out", required=True, metavar="FILE", help="JSONL results, one record per prompt")
    io.add_argument("--batch-size", type=int, default=8, help="prompts per batched generate call")
    io.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bar")

    # every flag of this group is named after its SamplingConfig field (dest == field name):
    # config_from_args and the error messages rely on it
    sampling = gen.add_argument_group("sampling (see sss_ext.SamplingConfig)")
    defaults = SamplingConfig()
    sampling.add_argument("--method", default="sss", choices=tuple(METHODS), help="decoding method")
    sampling.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="tokens generated per prompt at most")
    sampling.add_argument("--num-draft-tokens", type=int, default=defaults.num_draft_tokens, help="K, draft tokens per speculative round")
    sampling.add_argument("--draft-length-policy", default=defaults.draft_length_policy, choices=DRAFT_LENGTH_POLICIES,
                          help="fixed: K drafts every round; adaptive: K' in [1, K] from the rows' acceptance and the costs")
    sampling.add_argument("--draft-cost-ratio", type=float, default=defaults.draft_cost_ratio, metavar="RATIO",
                          help="adaptive policy: cost of a draft step / a target round; default: measured")
    sampling.add_argument("--proposer", default=defaults.proposer, choices=PROPOSERS,
                          help="sd / sss: draft: the aligned draft r samples the drafts; ngram: copy them from earlier "
                               "in the prompt and output (prompt lookup; sd then runs the target alone)")
    sampling.add_argument("--ngram-sizes", type=int, nargs=2, default=list(defaults.ngram_sizes), metavar=("MAX", "MIN"),
                          help="ngram proposer: the longest and the shortest suffix looked up, longest first")
    sampling.add_argument("--draft-tree", type=int, nargs="+", default=None, metavar="B",
                          help="sd / sss: draft a token tree with B children per node at each depth (e.g. 4 2 1) "
                               "instead of a chain of K, verified in one target forward")
    sampling.add_argument("--tree-replacement", action="store_true",
                          help="draft tree siblings i.i.d. (default: without replacement, which accepts more)")
    sampling.add_argument("--verification", default=defaults.verification, choices=VERIFICATIONS,
                          help="sd / sss chains: token-by-token, or block verification (never fewer accepted drafts in "
                               "expectation, the same law)")
    sampling.add_argument("--temperature", type=float, default=defaults.temperature, help="sampling temperature; 0 is greedy")
    sampling.add_argument("--top-k", type=int, default=defaults.top_k, help="keep the k most likely tokens; 0 disables")
    sampling.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus mass; 1 disables")
    sampling.add_argument("--top-k-ties", default=defaults.top_k_ties, choices=TOP_K_TIES,
                          help="keep: also keep tokens tied with the k-th largest logit (HF/vLLM); exact-k: exactly k")
    sampling.add_argument("--shift", type=float, default=defaults.shift, help="lambda, strength of the reward shift (r/d)^lambda")
    sampling.add_argument("--seed", type=int, default=defaults.seed, help="seed of the job; prompt i draws from (seed, i)")
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

    scale = gen.add_argument_group("scaling out (torchrun --nproc-per-node N -m sss_ext generate ...)")
    scale.add_argument("--resume", action="store_true", help="skip the prompts already in --out or <out>.partial "
                       "(generated with the same method and settings) and complete the file")
    scale.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                       help="under torchrun: seconds a rank waits for the others before the job fails")
    return parser


# ---------------------------------------------------------------- argument checks (nothing loads)

def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def config_from_args(args) -> SamplingConfig:
    """The :class:`SamplingConfig` of the sampling flags; ``ValueError`` naming the flag when a value is out of range."""
    fields = [field.name for field in dataclasses.fields(SamplingConfig) if hasattr(args, field.name)]
    values = {name: getattr(args, name) for name in fields}
    if values.get("eos_token_id") is not None:
        values["eos_token_id"] = tuple(values["eos_token_id"])
    try:
        return SamplingConfig(**values)
    except ValueError as error:
        message = re.sub(r"^SamplingConfig: ", "", str(error))
        for name in sorted(fields, key=len, reverse=True):
            if re.match(rf"{name}\b", message):
                raise ValueError(_flag(name) + message[len(name):]) from None
        raise ValueError(f"invalid sampling flags: {message}") from None


def _check_dir(flag: str, path: str | None) -> None:
    if path is not None and not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is not a local directory (models load with local_files_only=True)")


def _check_out(path: str) -> None:
    if os.path.isdir(path):
        raise ValueError(f"--out {path!r} is a directory; give a file path")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ValueError(f"--out {path!r} cannot be written ({parent!r} is not a writable directory)")


def _check_device(spec: str) -> None:
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {spec!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec!r}: CUDA is not available in this torch build / machine")


def load_callable(spec: str):
    """``MODULE:FUNCTION`` -> the callable (the current directory is importable); ``ValueError`` naming --reward-fn."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--reward-fn must look like MODULE:FUNCTION, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except ImportError as error:
        raise ValueError(f"--reward-fn {spec!r}: cannot import {module_name!r} ({error})") from None
    except AttributeError:
        raise ValueError(f"--reward-fn {spec!r}: module {module_name!r} has no {attribute!r}") from None
    if not callable(function):
        raise ValueError(f"--reward-fn {spec!r} is not callable")
    return function


def read_prompts(path: str) -> list[dict]:
    """The records of a JSONL prompts file; ``ValueError`` naming --prompts and the line otherwise."""
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
            if "prompt" in record and not (isinstance(record["prompt"], str) and record["prompt"]):
                raise ValueError(f'--prompts line {number}: "prompt" must be a non-empty string')
            if "prompt" not in record:
                ids = record["input_ids"]
                if not (isinstance(ids, list) and ids and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)):
                    raise ValueError(f'--prompts line {number}: "input_ids" must be a non-empty list of ints >= 0')
            records.append(record)
    if not records:
        raise ValueError(f"--prompts {path!r} holds no prompts")
    return records


def check_args(args) -> tuple[SamplingConfig, list[dict], object]:
    """(config, prompt records, reward callable or None): every check that needs no model, in flag order."""
    for flag, path in (("--target", args.target), ("--draft", args.draft), ("--ref", args.ref),
                       ("--tokenizer", args.tokenizer), ("--reward", args.reward)):
        _check_dir(flag, path)
    _check_device(args.device)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 < args.dist_timeout < float("inf"):
        raise ValueError(f"--dist-timeout must be a finite number of seconds > 0, got {args.dist_timeout}")
    config = config_from_args(args)
    if args.reward is not None and args.reward_fn is not None:
        raise ValueError("give either --reward or --reward-fn, not both")
    try:
        get_method(args.method).check_config(config)
    except ValueError as error:
        if "draft_tree=" in str(error):
            flag = f"--draft-tree {' '.join(map(str, config.draft_tree))}"
        elif "verification=" in str(error):
            flag = f"--verification {config.verification}"
        else:
            flag = f"--proposer {config.proposer}"
        raise ValueError(f"{flag}: {error}") from None
    if get_method(args.method).needs_reward and args.reward is None and args.reward_fn is None:
        raise ValueError(f"--method {args.method} needs --reward DIR or --reward-fn MODULE:FUNCTION "
                         f"(the embedded models' proxy reward: --reward-fn {_PROXY_REWARD_FN})")
    records = read_prompts(args.prompts)
    _check_out(args.out)
    reward_fn = load_callable(args.reward_fn) if args.reward_fn is not None else None
    return config, records, reward_fn


# ---------------------------------------------------------------- loading

def _load_model(flag: str, path: str, device: str, dtype: str, classification: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if classification else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(path, local_files_only=True, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as error:
        raise ValueError(f"{flag} {path!r} holds no loadable model: {error}") from None
    return model.to(device).eval()


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        return None


def default_roles(args) -> list[str]:
    """The model roles (generate() argument names) the method runs and no path gives: the embedded models fill them."""
    paths = {"target": args.target, "draft": args.draft, "ref_model": args.ref}
    return [role for role in get_method(args.method).models_for(config_from_args(args)) if paths[role] is None]


def load_tokenizer(args, use_defaults: bool):
    """--tokenizer, else the target's directory, else the embedded models' (when they run), else the draft's."""
    if args.tokenizer is not None:
        tokenizer = _load_tokenizer(args.tokenizer)
        if tokenizer is None:
            raise ValueError(f"--tokenizer {args.tokenizer!r} holds no loadable tokenizer")
        return tokenizer
    tokenizer = _load_tokenizer(args.target) if args.target is not None else None
    if tokenizer is None and use_defaults:
        from .models.target import load_tokenizer as load_default_tokenizer

        tokenizer = load_default_tokenizer()
    if tokenizer is None and args.draft is not None:
        tokenizer = _load_tokenizer(args.draft)
    return tokenizer


def load_models(args, device: str) -> dict:
    """``{"target", "draft", "ref_model", "reward"}`` on ``device``: given paths, the embedded models for the other roles the method runs."""
    import torch

    missing = default_roles(args)
    models = {}
    defaults = None
    if missing:
        from .models import load_default

        defaults = load_default(rewards=False, aligned="draft" in missing)
    paths = {"target": args.target, "draft": args.draft, "ref_model": args.ref}
    for role, flag in ROLE_FLAGS.items():
        if paths[role] is not None:
            models[role] = _load_model(flag, paths[role], device, args.dtype)
        elif role in missing:
            models[role] = getattr(defaults, BY_ARGUMENT[role].default).to(device=device, dtype=getattr(torch, args.dtype))
        else:
            models[role] = None
    models["reward"] = (_load_model("--reward", args.reward, device, args.dtype, classification=True)
                        if args.reward is not None else None)
    return models


def check_loaded(models: dict, tokenizer, prompts: list, method: str, config: SamplingConfig, reward_fn) -> None:
    """The checks of :func:`sss_ext.generate` on the loaded models and every prompt, before the progress bar."""
    from .decoding.scoring import check_reward
    from .decoding.validate import check_prompts, encode_prompts, resolve_models

    spec = get_method(method)
    try:
        model_set = resolve_models(models["target"], models["draft"], models["ref_model"], tokenizer, spec, config)
        if spec.needs_reward:
            check_reward(reward_fn, method, tokenizer, config.reward_input)
        check_prompts(encode_prompts(prompts, tokenizer), model_set, config)
    except ValueError as error:
        raise ValueError(f"the models, tokenizer and prompts do not fit together: {error}") from None


# ---------------------------------------------------------------- generating

def _prompt_of(record: dict):
    return record["prompt"] if "prompt" in record else [int(t) for t in record["input_ids"]]


def run_generate(args) -> int:
    config, records, reward_fn = check_args(args)
    use_defaults = bool(default_roles(args))
    tokenizer = load_tokenizer(args, use_defaults)
    if tokenizer is None and any("prompt" in r for r in records):
        raise ValueError("--prompts holds text prompts but no tokenizer was found; give --tokenizer DIR "
                         "or input_ids prompts")
    session = DistributedSession.from_env(args.device, args.dist_timeout)
    try:
        models = load_models(args, str(session.device))  # cuda:<LOCAL_RANK> under torchrun
        reward_fn = models["reward"] if models["reward"] is not None else reward_fn
        check_loaded(models, tokenizer, [_prompt_of(r) for r in records], args.method, config, reward_fn)
        return _generate_job(args, session, records, dict(target=models["target"], draft=models["draft"],
                                                          ref_model=models["ref_model"], tokenizer=tokenizer,
                                                          method=args.method, config=config, reward_fn=reward_fn))
    finally:
        session.close()


def _generate_job(args, session, records: list[dict], generate_kwargs: dict) -> int:
    from tqdm import tqdm

    partial_path, tmp_path = args.out + ".partial", args.out + ".tmp"
    done = {}
    if session.is_main:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        if args.resume:
            done = read_finished(records, (args.out, partial_path), generate_kwargs["method"], generate_kwargs["config"])
    skip = set(session.broadcast(sorted(done)))
    todo = [index for index in range(len(records)) if index not in skip]
    progress = None
    partial = None
    if session.is_main:
        progress = tqdm(total=len(records), initial=len(done), desc=args.method, unit="prompt",
                        disable=args.no_progress, file=sys.stderr)
        partial = open(partial_path, "w", encoding="utf-8")
        for record in done.values():
            partial.write(json.dumps(record) + "\n")

    def write(new_records: list[dict]) -> None:
        for record in new_records:
            source = records[record["index"]]
            record = {"index": record["index"], "id": source.get("id"), "prompt": source.get("prompt"), **record}
            done[record["index"]] = record
            partial.write(json.dumps(record) + "\n")
        partial.flush()
        progress.update(len(new_records))

    prompts = [_prompt_of(records[i]) for i in todo]
    try:
        generate_sharded(session, generate_kwargs.pop("target"), generate_kwargs.pop("draft"), prompts, prompt_indices=todo,
                         batch_size=args.batch_size, on_records=write, **generate_kwargs)
    finally:
        if partial is not None:
            partial.close()
            progress.close()
    if session.is_main:
        with open(tmp_path, "w", encoding="utf-8") as handle:
            for index in range(len(records)):
                handle.write(json.dumps(done[index]) + "\n")
        os.replace(tmp_path, args.out)
        os.remove(partial_path)
    return 0


def read_finished(records: list[dict], paths, method: str, config: SamplingConfig) -> dict[int, dict]:
    """Records of earlier runs in ``paths`` (JSONL) by index, checked against the prompts and settings.

    Lines that are not JSON (a record cut off by a crash) are skipped: that prompt runs again.
    """
    finished = {}
    for path in paths:
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                index = record.get("index") if isinstance(record, dict) else None
                if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(records):
                    raise ValueError(f"--resume: {path} line {number} has no valid index for the {len(records)} prompts")
                source = records[index]
                if record.get("prompt") != source.get("prompt") or record.get("id") != source.get("id"):
                    raise ValueError(f"--resume: {path} line {number} (index {index}) is not prompt {index} of --prompts")
                if record.get("method") != method or record.get("config") != config.to_dict():
                    raise ValueError(f"--resume: {path} line {number} (index {index}) was generated with another method "
                                     "or settings; use the same options, or start afresh without --resume")
                finished[index] = record
    return finished


def main(argv=None) -> int:
    """``python -m sss_ext``: help with no command; argument errors print ``error: ...`` and return 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return run_generate(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except DistributedGenerationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
