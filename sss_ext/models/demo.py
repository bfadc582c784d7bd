"""SSS on the default offline models, side by side with vanilla target sampling.

    python -m sss_ext.models.demo [--prompts 4] [--max-new-tokens 16] [--shift 1] [--k 2]

Prompts in (evaluation review openers), aligned continuations out, with the gold reward,
the acceptance rate and the target forward calls of SSS printed beside plain sampling from
the target on the same prompts.
"""

from __future__ import annotations

import argparse
import os
import time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--shift", type=float, default=1.0, help="lambda")
    ap.add_argument("--k", type=int, default=2, help="draft tokens per round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    import sss_ext
    from sss_ext.models import load_default, load_prompts

    t0 = time.time()
    m = load_default()
    print(f"loaded target (SmolLM2-135M-Instruct), drafts and rewards in {time.time() - t0:.1f}s")
    prompts = load_prompts("eval", args.prompts)
    cfg = sss_ext.SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                                 num_draft_tokens=args.k, shift=args.shift, ignore_eos=True)
    runs = {}
    for method in ("vanilla", "sss"):
        out = sss_ext.generate(m.target, m.draft, prompts, ref_model=m.ref_draft, tokenizer=m.tokenizer,
                               method=method, config=cfg)
        texts = [p + t for p, t in zip(prompts, out.texts)]
        runs[method] = (out, m.gold_reward(texts), m.proxy_reward(texts))
    for i, p in enumerate(prompts):
        print(f"\n> {p}")
        for method, (out, gold, _) in runs.items():
            st = out.stats.per_prompt[i]
            extra = f", acceptance {st.acceptance_rate:.2f}" if method == "sss" else ""
            print(f"  [{method:7s} gold {float(gold[i]):.2f}, target calls {st.target_calls}{extra}] {out.texts[i]!r}")
    print()
    for method, (out, gold, proxy) in runs.items():
        st = out.stats.total
        acc = f"  acceptance {st.acceptance_rate:.2f}" if method == "sss" else ""
        print(f"{method:7s}: mean gold reward {float(gold.mean()):.3f}  proxy {float(proxy.mean()):+.3f}  "
              f"target calls {st.target_calls} ({st.target_tokens} tokens){acc}  wall {st.wall_time:.1f}s")


if __name__ == "__main__":
    main()
