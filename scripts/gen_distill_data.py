"""Sample continuations of the *training* prompts from the target and keep the target's
next-token distributions along them (top-k log-probs + the remaining mass), the data the
draft is distilled on. Written to the user cache, never to the repository.

    nice -n 19 python scripts/gen_distill_data.py   # seeded; CPU time printed at the end
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sss_ext.models.manifest import update_manifest
from sss_ext.models.paths import PROMPTS_DIR, cache_dir
from sss_ext.models.target import EOS_TOKEN_ID, load_target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples-per-prompt", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--batch-size", type=int, default=150, help="CPU decoding is memory-bound: big batches are cheaper per token")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--limit", type=int, default=150, help="use only the first N training prompts (0: all 900)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = args.out or cache_dir() / "distill" / f"target_T{args.temperature}_n{args.max_new_tokens}_s{args.seed}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    t_cpu, t_wall = time.process_time(), time.time()
    model, tok = load_target()
    tok.padding_side = "left"
    rows = [json.loads(line) for line in open(PROMPTS_DIR / "train.jsonl")]
    if args.limit:
        rows = rows[: args.limit]
    prompts = [r["prompt"] for r in rows for _ in range(args.samples_per_prompt)]
    chunks = {"input_ids": [], "attention_mask": [], "topk_idx": [], "topk_logp": [], "rest_logp": []}
    done = resume(chunks, args, out)
    for start in range(done, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        torch.manual_seed(args.seed + start)  # per batch: a resumed run equals an uninterrupted one
        enc = tok(batch, return_tensors="pt", padding=True)
        with torch.no_grad():
            gen = model.generate(
                **enc, do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0,
                max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                pad_token_id=EOS_TOKEN_ID, output_logits=True, return_dict_in_generate=True,
            )
        logits = torch.stack(gen.logits, dim=1).float()  # (B, T, V): distributions of the new tokens
        logp = torch.log_softmax(logits, dim=-1)
        top = logp.topk(args.top_k, dim=-1)
        rest = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-7))
        plen = enc["input_ids"].shape[1]
        seq = gen.sequences
        mask = torch.cat([enc["attention_mask"], torch.ones(seq.shape[0], seq.shape[1] - plen, dtype=torch.long)], 1)
        chunks["input_ids"].append(seq)
        chunks["attention_mask"].append(mask)
        chunks["topk_idx"].append(top.indices.to(torch.int32))
        chunks["topk_logp"].append(top.values.to(torch.float16))
        chunks["rest_logp"].append(rest.to(torch.float32))
        save(chunks, args, out)  # after every batch: the job can be stopped and resumed at any time
        update_manifest(f"distill_data_{out.stem}", {
            "script": "scripts/gen_distill_data.py", "args": {k: str(v) for k, v in vars(args).items()},
            "sequences": start + len(batch), "positions": (start + len(batch)) * args.max_new_tokens,
            "resumed_after_sequences": done,
            "cpu_seconds": round(time.process_time() - t_cpu, 1), "wall_seconds": round(time.time() - t_wall, 1),
            "file": f"$SSS_EXT_CACHE/distill/{out.name} (not shipped)",
        })
        print(f"{start + len(batch)}/{len(prompts)} wall={time.time() - t_wall:.0f}s cpu={time.process_time() - t_cpu:.0f}s", flush=True)
    print(f"saved {out}  cpu={time.process_time() - t_cpu:.0f}s wall={time.time() - t_wall:.0f}s")


RESUME_KEYS = ("seed", "samples_per_prompt", "max_new_tokens", "temperature", "batch_size", "top_k")


def resume(chunks, args, out) -> int:
    """Keep the batches an earlier run with the same settings already wrote; return how many sequences."""
    if not out.exists():
        return 0
    data = torch.load(out)
    if any(data["meta"].get(key) != getattr(args, key) for key in RESUME_KEYS):
        raise SystemExit(f"{out} was written with other settings ({data['meta']}); pass --out to write elsewhere")
    for key in ("input_ids", "attention_mask", "topk_idx", "topk_logp", "rest_logp"):
        chunks[key].append(data[key])
    print(f"resuming after {data['input_ids'].shape[0]} sequences in {out}")
    return data["input_ids"].shape[0]


def save(chunks, args, out):
    """Left-pad the batches (different prompt widths) to one width and write them."""
    width = max(x.shape[1] for x in chunks["input_ids"])

    def lpad(x, value):
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    data = {
        "input_ids": torch.cat([lpad(x, EOS_TOKEN_ID) for x in chunks["input_ids"]]),
        "attention_mask": torch.cat([lpad(x, 0) for x in chunks["attention_mask"]]),
        "new_tokens": args.max_new_tokens,
        "topk_idx": torch.cat(chunks["topk_idx"]),
        "topk_logp": torch.cat(chunks["topk_logp"]),
        "rest_logp": torch.cat(chunks["rest_logp"]),
        "meta": vars(args) | {"out": str(out)},
    }
    torch.save(data, str(out) + ".tmp")
    Path(str(out) + ".tmp").replace(out)


def load_distill_data(paths: list[Path]) -> dict:
    """The data files written by this script, concatenated in order (rows left-padded to one width)."""
    parts = [torch.load(path) for path in paths]
    if len({part["new_tokens"] for part in parts}) != 1:
        raise SystemExit(f"{[str(p) for p in paths]} have different --max-new-tokens")
    width = max(part["input_ids"].shape[1] for part in parts)

    def lpad(x, value):
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    data = {key: torch.cat([part[key] for part in parts]) for key in ("topk_idx", "topk_logp", "rest_logp")}
    data["input_ids"] = torch.cat([lpad(part["input_ids"], EOS_TOKEN_ID) for part in parts])
    data["attention_mask"] = torch.cat([lpad(part["attention_mask"], 0) for part in parts])
    # the training prompt each row continues (rows follow the prompt order, samples_per_prompt each)
    data["prompt_index"] = torch.cat([torch.arange(part["input_ids"].shape[0]) // part["meta"]["samples_per_prompt"]
                                      for part in parts])
    data["new_tokens"] = parts[0]["new_tokens"]
    data["meta"] = [part["meta"] for part in parts]
    return data


if __name__ == "__main__":
    main()
