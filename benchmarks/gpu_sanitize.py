"""Workloads for compute-sanitizer in benchmarks/gpu_check.sh: the rows of the CUDA-on-CPU
harness matrix (python_tests/cuda/test_cuda_on_cpu.py) that reach each truncation path, as
torch tensors on the GPU.

- ``truncation``: V = 6144 (16384 for the radix plan), float32 and bfloat16, both tie rules:
  the bucketed collect, the level-2 refine, counted ties, the level-2 tie plan that falls
  back to the radix descent (close scores), the radix plan and a -inf top-k bucket; then
  ragged rows poisoned past each bonus position; ragged trees poisoned past each row's last
  node, with and without replacement (racecheck, synccheck);
- ``initcheck``: one truncated verify (close scores) on a fresh workspace;
- ``memcheck``: every logits row of a tensor ends exactly at the end of its allocation (run
  with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so each tensor is its own cudaMalloc), aligned and
  one element off 16 bytes, with and without truncation (verify, sample, verify_tree).

Usage: python benchmarks/gpu_sanitize.py WORKLOAD [--device cpu]   (cpu: the plumbing only)
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sss_ext  # noqa: E402

TIES = ("keep", "exact-k")


def pattern_logits(pattern: str, shape: tuple[int, ...], generator: torch.Generator, device: str) -> torch.Tensor:
    """Logits of the harness patterns (driver.cpp, fill_row). Shape: -> shape float32."""
    if pattern == "constant":
        return torch.full(shape, 0.5, device=device)
    if pattern == "narrow":  # every score inside one bucket of width 1/32
        return torch.rand(shape, generator=generator, device=device) * 0.03
    if pattern == "close":  # four scores within 2^-20 of each other
        return 1.0 + torch.randint(0, 4, shape, generator=generator, device=device) * 2.0**-22
    if pattern == "flat":  # four levels 0.25 apart: many ties
        return torch.randint(0, 4, shape, generator=generator, device=device) * 0.25
    if pattern == "masked":  # 100 finite logits per row
        out = torch.full(shape, float("-inf"), device=device)
        index = torch.randint(0, shape[-1], (*shape[:-1], 100), generator=generator, device=device)
        return out.scatter(-1, index, torch.randn(index.shape, generator=generator, device=device))
    return torch.randn(shape, generator=generator, device=device) * 2.0


# (pattern, vocab, top_k, top_p, with_ref) of the harness's truncation-path cases.
TRUNCATION_ROWS = (("normal", 6144, 5, 0.9, True), ("narrow", 6144, 0, 0.5, False), ("constant", 6144, 3000, 1.0, False),
                   ("constant", 6144, 0, 0.7, False), ("close", 6144, 3000, 0.999, False), ("close", 6144, 3000, 0.7, False),
                   ("flat", 16384, 10000, 0.2, False), ("masked", 6144, 3000, 0.9, False))


def verify(pattern, batch, num_draft, vocab, dtype, top_k, top_p, ties, with_ref, device, generator, **extra):
    target, draft, ref = (pattern_logits(pattern, (batch, num_draft + 1, vocab), generator, device).to(dtype) for _ in range(3))
    tokens = torch.randint(0, vocab, (batch, num_draft), generator=generator, device=device)
    return sss_ext.verify(target, draft, tokens, ref if with_ref else None, temperature=1.0, top_k=top_k, top_p=top_p,
                          top_k_ties=ties, generator=generator, validate=False, **extra)


def truncation(device, generator):
    for (pattern, vocab, top_k, top_p, with_ref), dtype, ties in itertools.product(
            TRUNCATION_ROWS, (torch.float32, torch.bfloat16), TIES):
        verify(pattern, 2, 1, vocab, dtype, top_k, top_p, ties, with_ref, device, generator)
    # Ragged rows: NaN logits, out-of-range ids and uniforms past each row's bonus position.
    batch, num_draft, vocab = 5, 4, 6144
    counts = torch.tensor([0, 1, 2, 3, 4], device=device)
    for pattern, top_k, top_p in (("normal", 0, 1.0), ("close", 3000, 0.7)):
        target, draft, ref = (pattern_logits(pattern, (batch, num_draft + 1, vocab), generator, device) for _ in range(3))
        tokens = torch.randint(0, vocab, (batch, num_draft), generator=generator, device=device)
        uniforms = sss_ext.draw_uniforms((batch, num_draft + 1), device, generator)
        for b, n in enumerate(counts.tolist()):
            target[b, n + 1:], ref[b, n + 1:], draft[b, n + 1:] = float("nan"), float("nan"), float("nan")
            tokens[b, n:], uniforms[b, n + 1:] = -3, 7.0
        sss_ext.verify(target, draft, tokens, ref, temperature=1.0, top_k=top_k, top_p=top_p, num_draft_tokens=counts,
                       uniforms=uniforms, validate=False)
    # Tree verification: ragged trees in both sibling modes, untruncated and on the close-score path.
    for (pattern, top_k, top_p), replacement in itertools.product((("normal", 0, 1.0), ("close", 3000, 0.7)), (True, False)):
        verify_tree(pattern, 6144, torch.float32, top_k, top_p, replacement, device, generator)


def verify_tree(pattern, vocab, dtype, top_k, top_p, replacement, device, generator, skew=0):
    """Ragged random trees (as the harness's tree cases) poisoned past each row's last node; with
    skew 1 the logits rows start one element past their own allocation."""
    batch, max_nodes = 4, 6
    full = [pattern_logits(pattern, (batch * max_nodes * vocab + skew,), generator, device).to(dtype) for _ in range(3)]
    target, draft, ref = (t[skew:].view(batch, max_nodes, vocab) for t in full)
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2]] * batch, device=device)
    tokens = torch.randint(0, vocab, (batch, max_nodes), generator=generator, device=device)
    uniforms = sss_ext.draw_uniforms((batch, max_nodes), device, generator)
    num_nodes = torch.tensor([1, 3, 5, 6], device=device)
    for b, n in enumerate(num_nodes.tolist()):
        target[b, n:], draft[b, n:], ref[b, n:] = float("nan"), float("nan"), float("nan")
        parents[b, n:], tokens[b, n:], uniforms[b, n:] = 99, -3, 7.0
    sss_ext.verify_tree(target, draft, tokens, parents, ref, num_nodes=num_nodes, uniforms=uniforms, temperature=1.0, top_k=top_k,
                        top_p=top_p, replacement=replacement, validate=False)


def initcheck(device, generator):
    verify("close", 1, 1, 6144, torch.float32, 3000, 0.7, "keep", False, device, generator)


def memcheck(device, generator):
    for dtype, (top_k, top_p), skew in itertools.product((torch.float32, torch.bfloat16, torch.float16), ((0, 1.0), (5, 0.9)), (0, 1)):
        batch, num_draft, vocab = 2, 3, 6147
        # One allocation per tensor; with skew 1 the rows start one element past it, and the last
        # row of each tensor still ends exactly at the end of the allocation.
        full = [pattern_logits("normal", (batch * (num_draft + 1) * vocab + skew,), generator, device).to(dtype) for _ in range(3)]
        target, draft, ref = (t[skew:].view(batch, num_draft + 1, vocab) for t in full)
        tokens = torch.randint(0, vocab, (batch, num_draft), generator=generator, device=device)
        sss_ext.verify(target, draft, tokens, ref, temperature=1.0, top_k=top_k, top_p=top_p, generator=generator, validate=False)
        sss_ext.sample(target[:, 0], 1.0, top_k, top_p, generator=generator, validate=False)
        verify_tree("normal", 6147, dtype, top_k, top_p, skew == 0, device, generator, skew)


WORKLOADS = {"truncation": truncation, "initcheck": initcheck, "memcheck": memcheck}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    generator = torch.Generator(device=args.device).manual_seed(0)
    WORKLOADS[args.workload](args.device, generator)
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(f"gpu_sanitize {args.workload} done on {args.device}")


if __name__ == "__main__":
    main()
