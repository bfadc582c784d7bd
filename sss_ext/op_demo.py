"""``python -m sss_ext.op_demo``: one batched SSS verification round on random logits.

Shows the op's inputs and outputs and checks it against the reference with the same
uniforms; needs no model.
"""

from __future__ import annotations

import time

import torch

import sss_ext


def main() -> None:
    batch, num_draft_tokens, vocab_size = 4, 4, 50272
    g = torch.Generator().manual_seed(0)
    target = 2 * torch.randn(batch, num_draft_tokens + 1, vocab_size, generator=g)
    draft = target + 0.5 * torch.randn(target.shape, generator=g)  # aligned draft r, close to q
    ref = draft + 0.5 * torch.randn(target.shape, generator=g)  # reference draft d
    draft_tokens = torch.stack(
        [sss_ext.sample(draft[:, i], temperature=0.8, generator=g) for i in range(num_draft_tokens)], dim=1
    )
    uniforms = sss_ext.draw_uniforms((batch, num_draft_tokens + 1), "cpu", g)
    start = time.perf_counter()
    result = sss_ext.verify(target, draft, draft_tokens, ref, temperature=0.8, uniforms=uniforms)
    elapsed = (time.perf_counter() - start) * 1e3
    expected = sss_ext.reference.verify(target, draft, draft_tokens, ref, temperature=0.8, uniforms=uniforms)
    print(f"B={batch} K={num_draft_tokens} V={vocab_size}, temperature 0.8, shift 1.0")
    print("draft tokens:\n", draft_tokens)
    print("emitted tokens (-1 = padding):\n", result.tokens)
    print("accepted per row:", result.num_accepted.tolist(), f"(op {elapsed:.1f} ms)")
    print("Z per position, row 0:", [round(z, 3) for z in result.log_z[0].exp().tolist()])
    print("matches the reference:", torch.equal(result.tokens, expected.tokens))


if __name__ == "__main__":
    main()
