"""Mutation testing of sss_ext: plant each mutant of MUTANTS, run the tests that should catch it, count.

A mutant is one exact text replacement in one file (the old text must occur exactly once).
Each runs in its own scratch copy of the tree (``build/mutation/<id>``: the files git knows,
hard-linked, the mutated file and the built extension copied), so the working tree is never
touched and ``--jobs`` copies can run side by side:

* Python mutants (``sss_ext/``) run their pytest selection in the copy (``PYTHONPATH`` = the copy);
* C++ mutants (``csrc/kernels/cpu/``, ``csrc/adapter/``) rebuild the extension in the copy
  (``setup.py build_ext --inplace``) first; a build that fails makes the mutant invalid;
* CUDA mutants (``csrc/kernels/cuda/``) build the CUDA-on-CPU driver against the mutated
  kernels (``python_tests/cuda/test_cuda_on_cpu.py``'s ``build_driver``) and run its case
  matrix: a case that differs from the CPU kernel, a harness defect or a crash kills it.

Outcomes: ``killed`` (the tests fail), ``survived`` (they pass), ``invalid`` (the mutant does
not build; not counted), ``timeout`` (counted as killed, as a hang is a detected change),
``equivalent`` (argued in the list, not run and not counted), ``error`` (the test selection
itself is broken; not counted), ``interrupted`` (the tests were stopped from outside, as when
the run is stopped; not counted). Score = killed / (killed + survived).

The report (``benchmarks/results/mutation.{md,csv}``) holds one row per mutant and, for each
row, the run it came from (start, commit of the tree, command, wall time, whether the run
finished, machine). A run of every mutant replaces the report; a run of some (``--only``)
merges into it (``--merge``/``--no-merge`` override): the rows of the mutants it ran are
replaced, the others kept with their runs, except rows of a mutant whose definition (file,
texts, tests) changed since, which are dropped and listed as not run.

    python scripts/mutation_test.py               # every mutant, report to benchmarks/results/mutation.{md,csv}
    python scripts/mutation_test.py --list        # the mutants, one a line
    python scripts/mutation_test.py --only cpu-kept-index ref-first-rejection --jobs 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import hashlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / "build" / "mutation"
RESULTS = ROOT / "benchmarks" / "results"

# Test selections (pytest arguments, run in the mutant's copy).
# Kept short (seconds to about a minute each when nothing fails; -x stops at the first failure).
_QUICK = ("test_edge_cases or (test_sweep_matches_reference and float32 and (0.7 or 0.0)) or test_sample_matches_reference"
          " or matches_reference_on_ties or every_row_is_the_uniform_call or garbage_past")
OPS = ["python_tests/ops/test_verify_matches_reference.py", "python_tests/ops/test_edge_cases.py",
       "python_tests/ops/test_top_k_ties.py", "python_tests/ops/test_ragged_verify.py", "-m", "not slow and not models", "-k", _QUICK]
OPS_UNIFORMS = ["python_tests/ops/test_uniforms.py", "python_tests/ops/test_bad_input.py", *OPS[:4], "-m", "not slow and not models",
                "-k", f"test_uniforms or test_bad_input or {_QUICK}"]
DECODING = ["python_tests/decoding/test_decoding_cache.py", "python_tests/decoding/test_decoding_greedy.py",
            "python_tests/decoding/test_randomness.py", "python_tests/decoding/test_decoding_stats.py",
            "python_tests/decoding/test_decoding_observer.py", "python_tests/decoding/test_rows.py", "-m", "not slow and not models"]
ONE_HOT = ["python_tests/ops/test_one_hot_drafts.py", "-m", "not slow and not models"]
BLOCK = ["python_tests/ops/test_block_verification.py", "-m", "not slow and not models", "-k", "op_equals_reference"]
TREE_OPS = ["python_tests/ops/test_tree_verification.py", "-m", "not slow and not models", "-k",
            "test_op_matches_reference_on_random_trees or test_enumerated_stream_law or test_chain_tree_is_verify"]
TREE_LOOP = ["python_tests/decoding/test_tree_decoding.py", "-m", "not slow and not models", "-k",
             "fresh_forward or greedy_tree or alone_or_in_a_batch or 3x2-without"]
CUDA_ALL = "cuda:all"  # the CUDA-on-CPU case matrix


@dataclasses.dataclass(frozen=True)
class Mutant:
    id: str
    file: str          # relative to the repository root
    old: str           # must occur exactly once in file
    new: str
    tests: tuple       # pytest arguments, or (CUDA_ALL,)
    description: str
    equivalent: str = ""  # a one-line argument: the mutant cannot change behaviour (excluded from the score)

    @property
    def area(self) -> str:
        if self.file.startswith("csrc/kernels/cpu/") or self.file.startswith("csrc/adapter/"):
            return "cpu-kernel"
        if self.file.startswith("csrc/kernels/cuda/"):
            return "cuda-kernel"
        if self.file in ("sss_ext/reference.py", "sss_ext/warp.py"):
            return "reference"
        if self.file in ("sss_ext/ops.py", "sss_ext/uniforms.py"):
            return "op-wrapper"
        if self.file.startswith("sss_ext/decoding/"):
            return "decoding"
        return "other"

    @property
    def kind(self) -> str:
        return {"cpu-kernel": "cpp", "cuda-kernel": "cuda"}.get(self.area, "python")


AREAS = ("cpu-kernel", "reference", "op-wrapper", "decoding", "cuda-kernel")


def M(id, file, old, new, tests, description, equivalent=""):
    return Mutant(id, file, old, new, tuple(tests), description, equivalent)


ROW_OPS, CPU_VERIFY, CPU_TREE = "csrc/kernels/cpu/row_ops.h", "csrc/kernels/cpu/verify.h", "csrc/kernels/cpu/tree.h"
MUTANTS = [
    # --- tree verification (CPU kernel and reference) and tree drafting in the loop ---
    M("tree-cpu-residual-unnormalised", CPU_TREE, "        p_law.total = residual_mass;", "        p_law.total = 1.0;",
      TREE_OPS, "after a rejection p is (p - q)+ without renormalisation"),
    M("tree-cpu-keeps-rejected", CPU_TREE, "remaining[v] = v == x ? 0.0 : q_prob(v);", "remaining[v] = q_prob(v);",
      TREE_OPS, "without replacement the rejected sibling stays in q"),
    M("tree-loop-keeps-siblings", "sss_ext/decoding/tree_run.py", "on_path = (out.path[:, :, None] == nodes).any(dim=1)",
      "on_path = (out.path[:, :, None] >= nodes).any(dim=1)", TREE_LOOP,
      "the caches keep every node up to the path's last instead of the path"),
    M("tree-loop-positions-by-index", "sss_ext/decoding/cache.py",
      "position_ids = round_lengths[:, None] + depth[first_node:end].to(tokens.device)[None]",
      "position_ids = round_lengths[:, None] + torch.arange(first_node, end, device=tokens.device)[None]", TREE_LOOP,
      "tree nodes take their node index as position instead of their depth"),
    M("tree-draw-with-removal-skipped", "sss_ext/decoding/draft_tree.py",
      "        weights = weights.scatter(1, children[-1][:, None], 0.0)\n", "", TREE_LOOP,
      "siblings are drawn i.i.d. while verified as drawn without replacement"),
    # --- the CPU kernel (rebuild) ---
    M("cpu-argmax-last-tie", ROW_OPS, "    if (s > best) {", "    if (s >= best) {", OPS,
      "greedy argmax breaks ties to the highest index instead of the lowest"),
    M("cpu-kept-index", ROW_OPS, "((score == threshold) & (v <= last_index))", "((score == threshold) & (v < last_index))", OPS,
      "the kept set drops the last kept token (tie boundary off by one)"),
    M("cpu-topk-nth", ROW_OPS, "order.begin() + (candidates - 1), order.end()", "order.begin() + candidates, order.end()", OPS,
      "top-k selects the (k+1)-th ranked token as the boundary"),
    M("cpu-topp-le", ROW_OPS, "while (num_kept < candidates && before < target)", "while (num_kept < candidates && before <= target)",
      OPS, "top-p keeps a token whose mass ranked before it reaches p exactly"),
    M("cpu-topp-ties", ROW_OPS, "if (!(sampling.top_p < 1.0) && sampling.keeps_ties())", "if (sampling.keeps_ties())", OPS,
      "top-k ties re-admitted after top-p cut them (keep rule applied after top-p)"),
    M("cpu-cdf-unnormalised", ROW_OPS, "const double threshold = u * total;", "const double threshold = u;", OPS,
      "inverse CDF does not scale u by the total mass (residual not renormalised)"),
    M("cpu-accept-uniform", CPU_VERIFY, "const double u = uniform(p, b, i);\n    const double log_p",
      "const double u = uniform(p, b, num_draft);\n    const double log_p", OPS,
      "acceptance coin of position i read from the correction/bonus column"),
    M("cpu-draw-uniform", CPU_VERIFY, "  const double u = uniform(p, b, num_draft);", "  const double u = uniform(p, b, j);", OPS,
      "correction draw uses the rejected position's coin instead of the column n"),
    M("cpu-paper-sign", CPU_VERIFY, "p.paper_mode ? log_p + out.log_z : log_p", "p.paper_mode ? log_p - out.log_z : log_p", OPS,
      "paper-mode acceptance divides by Z instead of multiplying"),
    M("cpu-logz-sign", CPU_VERIFY, "(l_s - l_q - shift * (l_r - l_d))", "(l_s - l_q + shift * (l_r - l_d))", OPS,
      "log Z adds the draft/ref log-sum difference instead of subtracting it"),
    M("cpu-one-hot-residual", CPU_VERIFY, "return v == x ? 0.0 : weight * p_star(v);", "return weight * p_star(v);", ONE_HOT,
      "one-hot drafts: the correction is drawn from p* with the rejected draft kept"),
    M("cpu-one-hot-accept", CPU_VERIFY, ": 0.0;  // one-hot: r~(x) = 1", ": -0.6931471805599453;  // one-hot: r~(x) = 1", ONE_HOT,
      "one-hot drafts accepted with probability min(1, 2 p*(x))"),
    M("cpu-block-threshold", CPU_VERIFY, "const double h = i < num_draft ? block_threshold(masses[i], weight_i) : weight_i;",
      "const double h = weight_i;", BLOCK, "block verification: h_i = p_i (the residual mass R_i forgotten)"),
    M("cpu-block-residual", CPU_VERIFY, "return residual_weight(weight * p_star(v), stats.proposal.prob(scores.proposal(v), v));",
      "return residual_weight(p_star(v), stats.proposal.prob(scores.proposal(v), v));", BLOCK,
      "block verification: the correction is drawn from (p* - r~)+ instead of (p_n p* - r~)+"),
    M("cpu-tilt-mask", CPU_VERIFY, "(q == -kInf || r == -kInf || d == -kInf) ? -kInf : s", "(q == -kInf || r == -kInf) ? -kInf : s",
      OPS, "a token masked only in the reference d gets +inf tilted score instead of -inf"),
    # --- the reference and the warping (pure Python) ---
    M("warp-topk-offbyone", "sss_ext/warp.py", "ranked >= ranked[..., top_k - 1 : top_k]", "ranked >= ranked[..., top_k : top_k + 1]",
      OPS, "top-k boundary read one rank too far"),
    M("warp-topp-le", "sss_ext/warp.py", "keep_ranked &= before < top_p * cumulative[..., -1:]",
      "keep_ranked &= before <= top_p * cumulative[..., -1:]", OPS, "top-p keeps the token whose prior mass equals p exactly"),
    M("warp-topp-over-all", "sss_ext/warp.py", "mass = torch.exp(ranked - ranked[..., :1]) * keep_ranked",
      "mass = torch.exp(ranked - ranked[..., :1])", OPS, "top-p measures mass over all tokens, not the top-k survivors"),
    M("warp-no-renormalise", "sss_ext/warp.py", "log_sum = torch.log(torch.exp(masked - top).sum(dim=-1, keepdim=True))",
      "log_sum = torch.log(torch.exp(scores - top).sum(dim=-1, keepdim=True))", OPS,
      "truncated distribution normalised over the full vocabulary (dropped renormalisation)"),
    M("ref-cdf-unnormalised", "sss_ext/reference.py", "threshold = uniforms * cumulative[:, -1]", "threshold = uniforms", OPS,
      "reference inverse CDF does not scale u by the total mass"),
    M("ref-first-rejection", "sss_ext/reference.py", "torch.cumprod(accept.to(torch.int64), dim=-1).sum(dim=-1)",
      "accept.to(torch.int64).sum(dim=-1)", OPS, "counts every accepted coin instead of the accepted prefix"),
    M("ref-paper-sign", "sss_ext/reference.py", "log_m_x = log_p_x + log_z[:, :K] if mode", "log_m_x = log_p_x - log_z[:, :K] if mode",
      OPS, "paper-mode acceptance divides by Z"),
    M("ref-residual-position", "sss_ext/reference.py", "log_r_tilde[rows, j.clamp(max=K - 1)]",
      "log_r_tilde[rows, (j - 1).clamp(min=0)]", OPS, "residual uses the proposal of the previous position"),
    M("ref-bonus-uniform", "sss_ext/reference.py", "last = inverse_cdf(weights, u[:, K])", "last = inverse_cdf(weights, u[:, 0])", OPS,
      "correction/bonus draw reads the first acceptance coin"),
    M("ref-tilt-mask", "sss_ext/reference.py", "masked = torch.isneginf(zq) | torch.isneginf(zr) | torch.isneginf(zd)",
      "masked = torch.isneginf(zq) | torch.isneginf(zr)", OPS, "a token masked only in d is not masked in the tilted score"),
    M("ref-ragged-uniforms", "sss_ext/reference.py", "uniforms=uniforms[rows, : n + 1],", "uniforms=uniforms[rows, -(n + 1):],", OPS,
      "ragged rows take their uniforms from the right end"),
    M("ref-one-hot-proposal", "sss_ext/reference.py", ".scatter(-1, x[..., None], 0.0)", ".scatter(-1, x[..., None], -0.5)",
      ONE_HOT, "one-hot drafts: the reference takes r~(x) = exp(-0.5) instead of 1"),
    M("ref-block-threshold", "sss_ext/reference.py", "h[:, i - 1] = block_threshold(mass, weight[:, i])", "h[:, i - 1] = weight[:, i]",
      BLOCK, "block verification in the reference: h_i = p_i"),
    M("ref-greedy-token", "sss_ext/reference.py", "tokens = _emit(x, num_accepted, best[rows, num_accepted])",
      "tokens = _emit(x, num_accepted, best[rows, 0])", OPS, "greedy correction token taken at position 0"),
    # --- the op wrapper and the uniforms ---
    M("uniforms-scale", "sss_ext/uniforms.py", ".mul_(2.0**-53)", ".mul_(2.0**-52)", OPS_UNIFORMS,
      "CPU uniforms on (0, 2) instead of (0, 1)"),
    M("uniforms-grid-cuda", "sss_ext/uniforms.py", "grid.to(torch.float64) * 2.0**-53", "grid.to(torch.float64) * 2.0**-52",
      OPS_UNIFORMS, "uniforms of the integer-grid path (every device but the plain CPU) on (0, 2)"),
    M("ops-swap-temperature-shift", "sss_ext/ops.py", "args = (target_logits, draft_logits, draft_tokens, ref_logits, uniforms, temperature, top_k, top_p, shift,",
      "args = (target_logits, draft_logits, draft_tokens, ref_logits, uniforms, shift, top_k, top_p, temperature,", OPS_UNIFORMS, "temperature and shift passed to the op swapped"),
    M("ops-drop-ragged", "sss_ext/ops.py", "        num_draft_tokens, top_k_ties, aligned_logits, verification)\n        tokens, num_accepted",
      "        None, top_k_ties, aligned_logits, verification)\n        tokens, num_accepted", OPS_UNIFORMS,
      "num_draft_tokens not passed to the op"),
    M("ops-sample-ties", "sss_ext/ops.py", "args = (logits, uniforms, temperature, top_k, top_p, top_k_ties)",
      "args = (logits, uniforms, temperature, top_k, top_p, \"keep\")", OPS_UNIFORMS, "sample ignores top_k_ties"),
    M("ops-bool-accepted", "sss_ext/ops.py", "        if _BOOL in (type(temperature), type(top_k), type(top_p), type(shift)):",
      "        if False:", OPS_UNIFORMS, "verify takes a bool for a number"),
    # --- the decoding loop's acceptance bookkeeping ---
    M("spec-emit-count", "sss_ext/decoding/speculative.py", "self.book.append(out.tokens, accepted + 1,",
      "self.book.append(out.tokens, accepted,", DECODING, "the correction/bonus token is not appended"),
    M("spec-pending", "sss_ext/decoding/speculative.py", "self.pending = out.tokens.gather(1, accepted[:, None]).squeeze(1)",
      "self.pending = out.tokens.gather(1, (accepted - 1).clamp(min=0)[:, None]).squeeze(1)", DECODING,
      "the next round continues from the last accepted draft instead of the correction token"),
    M("spec-rollback-keep", "sss_ext/decoding/speculative.py", "        keep = accepted + 1\n", "        keep = accepted\n", DECODING,
      "caches keep one slot too few after a round"),
    M("spec-no-ref-rollback", "sss_ext/decoding/speculative.py", "            self.ref.rollback(keep)\n", "            pass\n", DECODING,
      "the reference cache is not rolled back"),
    M("spec-carry", "sss_ext/decoding/speculative.py", "self.carry = accepted == num_draft", "self.carry = accepted == num_draft - 1",
      DECODING, "SD carries the last draft after the wrong rounds"),
    M("spec-uniforms-used", "sss_ext/decoding/speculative.py", "used=None if row_draft is None else row_draft + 1)",
      "used=None if row_draft is None else row_draft)", DECODING, "ragged rows consume one uniform too few per round"),
    M("rows-budget", "sss_ext/decoding/rows.py", "        count = torch.minimum(count, self.max_new_tokens - start)\n", "", DECODING,
      "rows emit past max_new_tokens"),
    M("rows-eos", "sss_ext/decoding/rows.py", "count = torch.where(hit_eos, first + 1, count)", "count = torch.where(hit_eos, first, count)",
      DECODING, "the EOS token is cut off"),
    M("rows-logz", "sss_ext/decoding/rows.py", "kept_z = torch.where(columns[None] < count[:, None]",
      "kept_z = torch.where(columns[None] <= count[:, None]", DECODING, "log Z of one token past the kept ones is summed"),
    M("cache-rollback-rank", "sss_ext/decoding/cache.py", "kept = new & (rank <= keep[:, None])", "kept = new & (rank < keep[:, None])",
      DECODING, "rollback keeps one valid slot too few"),
    M("cache-positions", "sss_ext/decoding/cache.py", "torch.cumsum(token_mask, dim=1) - 1).clamp_min(0)",
      "torch.cumsum(token_mask, dim=1)).clamp_min(0)", DECODING, "positions of a masked (carry) step off by one"),
    # --- the CUDA source under the CUDA-on-CPU harness ---
    M("cuda-topk-rank", "csrc/kernels/cuda/bucket_select.cuh",
      "const unsigned long long rank = static_cast<unsigned long long>(sampling.top_k - 1);",
      "const unsigned long long rank = static_cast<unsigned long long>(sampling.top_k);", [CUDA_ALL],
      "make_plan's top-k rank off by one"),
    M("cuda-fast-exp-flush", "csrc/kernels/cuda/device_utils.cuh", "if (!(x >= kExpFlush)) return 0.0;", "if (!(x >= kExpFlush)) return 1.0;",
      [CUDA_ALL], "fast_exp returns 1 below its flush threshold (and for -inf)"),
    M("cuda-kept-index", "csrc/kernels/cuda/problem.cuh", "(score == threshold && v <= last_index)",
      "(score == threshold && v < last_index)", [CUDA_ALL], "the kept set drops the last kept token"),
    M("cuda-argmax-last-tie", "csrc/kernels/cuda/stats.cuh", "            if (x[e] > best) {", "            if (x[e] >= best) {", [CUDA_ALL],
      "greedy argmax breaks ties within a vector to the higher index"),
    M("cuda-paper-sign", "csrc/kernels/cuda/draw.cuh", "p.paper_mode ? log_p + out.log_z : log_p", "p.paper_mode ? log_p - out.log_z : log_p",
      [CUDA_ALL], "paper-mode acceptance divides by Z"),
    M("cuda-first-rejection", "csrc/kernels/cuda/draw.cuh", "atomicMin(&out.first_rejection, static_cast<int>(i));",
      "atomicMax(&out.first_rejection, static_cast<int>(i));", [CUDA_ALL], "the last rejection ends the row instead of the first"),
    M("cuda-cdf-unnormalised", "csrc/kernels/cuda/draw.cuh", "const double threshold = __dmul_rn(u, total);", "const double threshold = u;",
      [CUDA_ALL], "the draw does not scale u by the total mass"),
    M("cuda-one-hot-residual", "csrc/kernels/cuda/draw.cuh", "one_hot ? (v == one_hot_token ? 0.0 : scaled_p)", "one_hot ? scaled_p",
      [CUDA_ALL], "one-hot drafts: the correction is drawn from p* with the rejected draft kept"),
    M("cuda-block-threshold", "csrc/kernels/cuda/draw.cuh",
      "const double h = i < num_draft ? block_threshold(pr.block_masses[b * pr.positions() + i], weight_i) : weight_i;",
      "const double h = weight_i;", [CUDA_ALL], "block verification: h_i = p_i (the residual mass R_i forgotten)"),
    M("cuda-tree-q-keeps-rejected", "csrc/kernels/cuda/tree.cuh", "remaining[v] = v == x ? 0.0 : q;", "remaining[v] = q;", [CUDA_ALL],
      "tree siblings without replacement: q keeps the rejected token"),
    M("cuda-tree-p-not-residual", "csrc/kernels/cuda/tree.cuh", "      sh.p_slot = residual_slot;\n", "", [CUDA_ALL],
      "tree walk: a rejection leaves p unchanged instead of the residual"),
    M("cuda-residual-logz", "csrc/kernels/cuda/draw.cuh", "log_z = pr.p.paper_mode ? at_j.log_z : 0.0;", "log_z = at_j.log_z;",
      [CUDA_ALL], "exact mode's residual divides the proposal by Z"),
]


# ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    id: str
    area: str
    outcome: str   # killed / survived / invalid / timeout / equivalent / error / interrupted
    seconds: float
    detail: str
    run: dict = dataclasses.field(default_factory=dict)  # the run the row came from (RUN_FIELDS)


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                         capture_output=True).stdout
    return [name for name in out.decode().split("\0") if name and (ROOT / name).is_file()]


def apply(text: str, mutant: Mutant) -> str:
    count = text.count(mutant.old)
    if count != 1:
        raise ValueError(f"{mutant.id}: the old text occurs {count} times in {mutant.file} (must be once)")
    return text.replace(mutant.old, mutant.new)


def scratch_copy(mutant: Mutant) -> Path:
    """build/mutation/<id>: the tree hard-linked, the mutated file and the built extension as real copies."""
    copy = SCRATCH / mutant.id
    shutil.rmtree(copy, ignore_errors=True)
    for name in tracked_files():
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name == mutant.file:
            target.write_text(apply((ROOT / name).read_text(), mutant))
        else:
            os.link(ROOT / name, target)
    for built in (ROOT / "sss_ext").glob("_C*.so"):  # copied: a rebuild writes it in place
        shutil.copy2(built, copy / "sss_ext" / built.name)
    return copy


def run_logged(command, cwd, env, timeout, log: Path) -> tuple[int | None, str]:
    with open(log, "a") as out:
        out.write(f"$ {' '.join(map(str, command))}\n")
        out.flush()
        try:
            done = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, "timeout"
    return done.returncode, ""


def last_lines(log: Path, n: int = 1) -> str:
    """The log's last lines, with this machine's paths written repository-relative (the report ships)."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    text = " | ".join(lines[-n:]).replace(sys.executable, "python").replace(str(ROOT) + "/", "")
    return text[-300:]


def run_python_tests(mutant: Mutant, copy: Path, log: Path, timeout: float) -> tuple[str, str]:
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    code, why = run_logged([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests], copy, env, timeout,
                           log)
    if code is None:
        return "timeout", f"tests ran past {timeout:.0f} s"
    if code in (-signal.SIGINT, -signal.SIGTERM) or (code == 2 and "KeyboardInterrupt" in log.read_text(errors="replace")):
        return "interrupted", last_lines(log)  # stopped from outside (the run was stopped): nothing was detected
    if code == 0:
        return "survived", last_lines(log)
    if code in (4, 5):  # usage error / nothing collected: the selection is broken, not the mutant caught
        return "error", last_lines(log, 3)
    return "killed", last_lines(log)


def run_cuda_matrix(mutant: Mutant, copy: Path, log: Path, timeout: float) -> tuple[str, str]:
    sys.path.insert(0, str(ROOT / "python_tests" / "cuda"))
    import test_cuda_on_cpu as harness  # noqa: E402  (the harness's own build and run helpers)

    try:
        driver = harness.build_driver("plain", copy / "csrc" / "kernels", tag=f"-mut-{mutant.id}")
    except AssertionError as error:
        with open(log, "a") as out:
            out.write(str(error))
        return "invalid", "driver build failed"
    try:
        code, results, fatal = stream_driver(driver, harness, log, timeout)
    finally:
        shutil.rmtree(driver.parent, ignore_errors=True)
    if code is None:
        return "timeout", f"driver ran past {timeout:.0f} s"
    failed = [name for name, line in results.items() if not line.startswith("ok ")]
    if code != 0 or failed or len(results) < len(harness.CASES):
        where = f"case {failed[0]} differs from the CPU kernel" if failed else f"exit {code} after {len(results)} cases"
        return "killed", f"{where} {fatal}".strip()[:300]
    # the matrix's path checks (test_cuda_on_cpu.py): a wrong plan can still give the right tokens
    run = harness.Run(code, "", "", results)
    checks = [lambda: harness.test_every_path_is_reached(run), lambda: harness.test_truncating_sweep_rows_need_no_radix_descent(run),
              lambda: harness.test_the_resolve_race_case_reaches_the_radix_fallback(run)]
    checks += [lambda n=name: harness.test_each_truncation_case_takes_its_path(run, n) for name in harness.CASES if name.startswith("trunc-")]
    for check in checks:
        try:
            check()
        except AssertionError as error:
            return "killed", f"path census: {str(error).splitlines()[0]}"[:300]
    return "survived", f"all {len(results)} cases equal the CPU kernel and take their paths"


def stream_driver(driver: Path, harness, log: Path, timeout: float):
    """Runs the whole case matrix, stopping at the first failing case or harness defect."""
    import re
    text = "\n".join(harness.case_line(name, keys) for name, keys in harness.CASES.items()) + "\n"
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0")
    results, fatal = {}, ""
    deadline = time.monotonic() + timeout
    with open(log, "a") as out, subprocess.Popen([str(driver)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                  stderr=out, text=True, env=env) as proc:
        proc.stdin.write(text)
        proc.stdin.close()
        for line in proc.stdout:
            out.write(line)
            match = re.match(r"(ok|FAIL) (\S+)", line)
            if match:
                results[match.group(2)] = line
            if line.startswith("cuda_on_cpu:"):
                fatal = line.strip()
            if (match and match.group(1) == "FAIL") or fatal or time.monotonic() > deadline:
                proc.kill()
                break
        code = proc.wait()
    if time.monotonic() > deadline and len(results) < len(harness.CASES) and not fatal:
        return None, results, fatal
    return code, results, fatal


def run_mutant(mutant: Mutant, timeout: float, keep: bool) -> Result:
    start = time.monotonic()
    if mutant.equivalent:
        return Result(mutant.id, mutant.area, "equivalent", 0.0, mutant.equivalent)
    copy = scratch_copy(mutant)
    log = SCRATCH / f"{mutant.id}.log"
    log.write_text("")
    try:
        if mutant.kind == "cpp":
            env = dict(os.environ, MAX_JOBS="1")
            code, _ = run_logged([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], copy, env, 1800, log)
            if code != 0:
                return Result(mutant.id, mutant.area, "invalid", time.monotonic() - start, "extension build failed")
        if mutant.kind == "cuda":
            outcome, detail = run_cuda_matrix(mutant, copy, log, timeout)
        else:
            outcome, detail = run_python_tests(mutant, copy, log, timeout)
    finally:
        if not keep:
            shutil.rmtree(copy, ignore_errors=True)
    return Result(mutant.id, mutant.area, outcome, time.monotonic() - start, detail)


def score(results: list[Result]) -> tuple[int, int, float]:
    killed = sum(r.outcome in ("killed", "timeout") for r in results)
    survived = sum(r.outcome == "survived" for r in results)
    return killed, survived, killed / max(killed + survived, 1)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def fingerprint(mutant: Mutant) -> str:
    """A short hash of what the mutant plants and runs: a report row of another definition is stale."""
    text = "\0".join([mutant.file, mutant.old, mutant.new, *mutant.tests, mutant.equivalent])
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def tree_commit() -> str:
    """HEAD's short hash, with "+local changes" when the tree the copies are made of differs from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short=10", "HEAD") or "unknown"
    report = [f":(exclude)benchmarks/results/mutation.{ext}" for ext in ("md", "csv")]
    return head + (" +local changes" if git("status", "--porcelain", "--", ".", *report) else "")


def run_command(argv: list[str], ran: int) -> str:
    """The command line as typed, with the --only list shortened to its count."""
    words, skipping = ["python", "scripts/mutation_test.py"], False
    for word in argv:
        if word == "--only":
            words.append(f"--only ({ran} ids)")
            skipping = True
        elif skipping and not word.startswith("-"):
            continue
        else:
            skipping = False
            words.append(word)
    return " ".join(words)


RUN_FIELDS = ("run_started", "run_commit", "run_command", "run_wall_s", "run_state", "run_machine")
CSV_FIELDS = ("id", "area", "file", "outcome", "seconds", "description", "detail", "mutant", *RUN_FIELDS)


def earlier_results(skip: set) -> list[Result]:
    """Rows of the last report for mutants of the current list that this run did not run, with the run
    each came from; a row of a mutant whose definition changed since is dropped (that mutant is not run)."""
    path = RESULTS / "mutation.csv"
    if not path.exists():
        return []
    current = {m.id: fingerprint(m) for m in MUTANTS}
    kept = []
    with open(path, newline="") as rows:
        for row in csv.DictReader(rows):
            if (row["id"] not in current or row["id"] in skip or row["outcome"] == "equivalent"
                    or row.get("mutant", current[row["id"]]) != current[row["id"]]):
                continue
            run = {field: row.get(field) or "" for field in RUN_FIELDS}
            kept.append(Result(row["id"], row["area"], row["outcome"], float(row["seconds"]), row["detail"], run))
    return kept


def write_report(results: list[Result], merge: bool) -> None:
    """benchmarks/results/mutation.{csv,md}: one row per mutant, each with the run it came from."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    by_id = {m.id: m for m in MUTANTS}
    order = {m.id: i for i, m in enumerate(MUTANTS)}
    if merge:  # keep the last report's rows of the mutants not run now
        results = results + earlier_results({r.id for r in results})
    results += [Result(m.id, m.area, "equivalent", 0.0, m.equivalent) for m in MUTANTS  # argued in the list, never run
                if m.equivalent and m.id not in {r.id for r in results}]
    results = sorted(results, key=lambda r: order[r.id])
    with open(RESULTS / "mutation.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(CSV_FIELDS)
        for r in results:
            m = by_id[r.id]
            writer.writerow([r.id, r.area, m.file, r.outcome, f"{r.seconds:.1f}", m.description, r.detail, fingerprint(m),
                             *(r.run.get(field, "") for field in RUN_FIELDS)])
    killed, survived, fraction = score(results)
    counts = {o: sum(r.outcome == o for r in results)
              for o in ("killed", "timeout", "survived", "invalid", "equivalent", "error", "interrupted")}
    missing = [m.id for m in MUTANTS if m.id not in {r.id for r in results}]
    runs = {}  # run key -> label, in order of start
    ran = sorted((r for r in results if r.outcome != "equivalent"), key=lambda r: r.run.get("run_started", ""))
    for r in ran:
        runs.setdefault(tuple(r.run.get(f, "") for f in RUN_FIELDS), f"R{len(runs) + 1}")
    label = {r.id: "-" for r in results}
    label.update({r.id: runs[tuple(r.run.get(f, "") for f in RUN_FIELDS)] for r in ran})
    lines = [
        "# Mutation score",
        "",
        f"**Score: {killed} killed of {killed + survived} = {100 * fraction:.1f}%** "
        f"(killed {counts['killed']}, timeout {counts['timeout']} counted as killed, survived {counts['survived']}; "
        f"not counted: equivalent {counts['equivalent']}, invalid {counts['invalid']}, selection error {counts['error']}, "
        f"interrupted {counts['interrupted']}, "
        f"not run {len(missing)}) over the {len(MUTANTS)} mutants of `scripts/mutation_test.py`.",
        "",
        (f"Every mutant of the list has a row, from {len(runs)} run{'s' if len(runs) > 1 else ''} "
         f"({sum(r.seconds for r in results) / 60:.1f} min of mutant time over every row):" if not missing else
         f"**Incomplete**: {len(missing)} mutants have no row (not run, or their definition changed since their run): "
         + ", ".join(f"`{i}`" for i in missing) + f". The {len(results)} rows come from {len(runs)} runs:"),
        "",
        "| run | started (UTC) | tree (commit) | command | rows | wall time | state | machine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, name in runs.items():
        info = dict(zip(RUN_FIELDS, key))
        wall = f"{float(info['run_wall_s']) / 60:.1f} min" if info["run_wall_s"] else "not recorded"
        lines.append(f"| {name} | {info['run_started'] or 'not recorded'} | `{info['run_commit'] or '?'}` | "
                     f"`{info['run_command'] or '?'}` | {sum(v == name for v in label.values())} | {wall} | "
                     f"{info['run_state'] or '?'} | {info['run_machine'] or '?'} |")
    lines += [
        "",
        "Each mutant runs in its own copy of the tree: Python mutants run their pytest selection, C++ mutants rebuild",
        "the extension first, CUDA mutants build the CUDA-on-CPU driver against the mutated kernels and run its case",
        "matrix. A run's wall time includes the mutants of it whose rows were later replaced by a newer run.",
        "",
        *([f"Argued equivalent (not run, not counted): "
           + "; ".join(f"`{m.id}`: {m.equivalent}" for m in MUTANTS if m.equivalent) + ".", ""]
          if any(m.equivalent for m in MUTANTS) else []),
        "| id | area | file | outcome | s | run | mutation | detail |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = by_id[r.id]
        detail = r.detail.replace("|", "/").replace("\n", " ")
        lines.append(f"| `{r.id}` | {r.area} | `{m.file}` | {r.outcome} | {r.seconds:.0f} | {label[r.id]} | {m.description} | {detail} |")
    (RESULTS / "mutation.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants")
    parser.add_argument("--merge", action=argparse.BooleanOptionalAction, default=None,
                        help="keep the report's rows of the mutants not run now, each with its run "
                             "(default: with --only; --no-merge writes only this run's rows)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run side by side (default 1)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant's tests (default 900)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies in build/mutation/")
    parser.add_argument("--no-report", action="store_true", help="print only; leave benchmarks/results/ alone")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)

    if args.list:
        for m in MUTANTS:
            print(f"{m.id:28s} {m.area:12s} {m.file:38s} {m.description}{'  [equivalent: ' + m.equivalent + ']' if m.equivalent else ''}")
        return 0
    selected = MUTANTS
    if args.only:
        unknown = set(args.only) - {m.id for m in MUTANTS}
        if unknown:
            parser.error(f"unknown mutant ids: {sorted(unknown)}")
        selected = [m for m in MUTANTS if m.id in args.only]
    merge = bool(args.only) if args.merge is None else args.merge
    for m in selected:  # fail early if the list has rotted
        apply((ROOT / m.file).read_text(), m)
    if any(m.kind == "python" for m in selected) and not list((ROOT / "sss_ext").glob("_C*.so")):
        # the copies import sss_ext from themselves: without the extension every test would fail and "kill"
        parser.error(f"no built extension in {ROOT / 'sss_ext'}: run `python setup.py build_ext --inplace` in this tree first")
    SCRATCH.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    run = {"run_started": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "run_commit": tree_commit(),
           "run_command": run_command(argv, len(selected)),
           "run_machine": f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
                          f"Python {platform.python_version()}, nice {os.nice(0)}"}
    results = []

    def report(state: str) -> None:
        run.update(run_wall_s=f"{time.monotonic() - start:.0f}", run_state=state)
        for r in results:
            r.run = {} if r.outcome == "equivalent" else run
        write_report(list(results), merge)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        # fastest kinds first: Python, then the CUDA harness, then the C++ rebuilds
        ordered = sorted(selected, key=lambda m: ("python", "cuda", "cpp").index(m.kind))
        futures = {pool.submit(run_mutant, m, args.timeout, args.keep): m for m in ordered}
        for future in concurrent.futures.as_completed(futures):
            r = future.result()
            results.append(r)
            print(f"{r.outcome:10s} {r.id:28s} {r.seconds:6.0f} s  {r.detail[:120]}", flush=True)
            if not args.no_report:  # a report after every mutant: a stopped run leaves what it did
                report(f"stopped after {len(results)} of {len(selected)}" if len(results) < len(selected) else "finished")
    wall = time.monotonic() - start
    killed, survived, fraction = score(results)
    print(f"\nthis run: {killed}/{killed + survived} = {100 * fraction:.1f}% killed; {wall / 60:.1f} min")
    if not args.no_report:
        report("finished")
        print(f"report: {RESULTS / 'mutation.md'}, {RESULTS / 'mutation.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
