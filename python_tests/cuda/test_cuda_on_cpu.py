"""The CUDA kernels' own source executed on the CPU (csrc/testing/cuda_on_cpu, docs/cuda_on_cpu.md).

The driver compiles csrc/kernels/cuda/ unmodified with the host compiler against a runtime of
the CUDA built-ins (fibers or OS threads, barriers that check their source line, warp
collectives over per-lane slots), runs every case in forward and reverse block and thread
order, and requires the tokens and num_accepted of the CPU kernel (log Z within float32
rounding; a row the CPU kernel refuses must be an invalid row). The matrix mirrors
test_cuda.py and reaches every truncation path, which the per-case path census shows. The
same matrix runs under AddressSanitizer + UBSan with exact-size buffers; planted defects in a
copy of the kernels (the resolve kernel's barrier race, a missing barrier, a read past a row,
a shared-memory race under ThreadSanitizer, a tree walk whose q keeps a rejected sibling) must be
caught.

Run alone: ``python -m pytest python_tests/cuda/test_cuda_on_cpu.py -q --run-slow`` (the whole
module is marked slow; CI runs it); the ThreadSanitizer tests also need
``SSS_CUDA_ON_CPU_TSAN=1`` (minutes).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "csrc" / "testing" / "cuda_on_cpu"
KERNELS = ROOT / "csrc" / "kernels"
BUILD = ROOT / "build" / "cuda_on_cpu"
CXX = os.environ.get("CXX", "g++")
TSAN = os.environ.get("SSS_CUDA_ON_CPU_TSAN") == "1"

if shutil.which(CXX) is None:
    pytest.skip(f"no host C++ compiler ({CXX!r} not found; set CXX)", allow_module_level=True)

# Minutes of compiling and running: CI's --run-slow runs it, the README's quick command does not.
pytestmark = pytest.mark.slow

FLAGS = {
    "plain": ["-O1"],
    "asan": ["-O1", "-g1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
    "tsan": ["-O1", "-g1", "-fsanitize=thread", "-DSSS_CUDA_ON_CPU_OS_THREADS"],
}

# ---------------------------------------------------------------------------------------
# The case matrix: one dict of driver keys per case (driver.cpp, struct Case).

DTYPES = ("f32", "bf16", "f16")
MODES = (("exact", False), ("exact", True), ("paper", True))  # (mode, with_ref), as test_cuda.py
TEMPERATURES = (0.0, 0.01, 0.1, 0.7, 1.0)
TRUNCATIONS = ((0, 1.0), (5, 1.0), (0, 0.8), (20, 0.9))  # (top_k, top_p)
SHAPES = ((1, 1, 2), (3, 4, 7), (3, 4, 111), (2, 8, 111), (1, 4, 50272))  # (B, K, V)
TREE_TILTS = ((1, 2.0), (0, 1.0), (1, 0.0))  # (with_ref, shift): the tilt, no ref, a ref at shift 0
TREE_VOCABS = (1, 99, 111, 989)
TREE_NODES = (1, 5, 7, 9)  # max_nodes
TREE_SHAPES = ("random", "wide", "chain")


def build_cases() -> dict[str, dict]:
    cases: dict[str, dict] = {}

    def add(name: str, **keys):
        assert name not in cases, name
        cases[name] = keys

    # Sweep: every dtype x mode x truncation, shapes and temperatures rotated through.
    for d, dtype in enumerate(DTYPES):
        for m, (mode, with_ref) in enumerate(MODES):
            for t, (top_k, top_p) in enumerate(TRUNCATIONS):
                batch, num_draft, vocab = SHAPES[(d + m + t) % len(SHAPES)]
                temperature = TEMPERATURES[(3 * d + m + t) % len(TEMPERATURES)]
                add(f"sweep-{dtype}-{mode}{'-ref' if with_ref else ''}-k{top_k}-p{top_p}", dtype=dtype, B=batch, K=num_draft,
                    V=vocab, temp=temperature, top_k=top_k, top_p=top_p, ref=int(with_ref), paper=int(mode == "paper"),
                    shift=2.0 if with_ref else 1.0, seed=d * 100 + m * 10 + t)
    # Truncation paths at V = 6144 (and 16384): the bucketed selection and its fallbacks.
    for dtype in ("f32", "bf16"):
        for ties in ("keep", "exact"):
            common = dict(dtype=dtype, ties=ties, temp=1.0)
            add(f"trunc-collect-{dtype}-{ties}", **common, B=2, K=2, V=6144, top_k=5, top_p=0.9, ref=1, shift=2.0)
            add(f"trunc-refine-{dtype}-{ties}", **common, B=1, K=1, V=6144, top_p=0.5, ref=0, pattern="narrow")
            add(f"trunc-constant-k-{dtype}-{ties}", **common, B=1, K=1, V=6144, top_k=3000, ref=0, pattern="constant")
            add(f"trunc-constant-p-{dtype}-{ties}", **common, B=1, K=1, V=6144, top_p=0.7, ref=0, pattern="constant")
            add(f"trunc-close-p999-{dtype}-{ties}", **common, B=1, K=1, V=6144, top_k=3000, top_p=0.999, ref=0, pattern="close")
            add(f"trunc-close-p7-{dtype}-{ties}", **common, B=1, K=1, V=6144, top_k=3000, top_p=0.7, ref=0, pattern="close")
            add(f"trunc-radix-{dtype}-{ties}", **common, B=1, K=1, V=16384, top_k=10000, top_p=0.2, ref=0, pattern="flat")
            add(f"trunc-minus-inf-{dtype}-{ties}", **common, B=1, K=1, V=6144, top_k=3000, top_p=0.9, ref=0, pattern="masked",
                finite=100)
    # Ragged rows, poisoned (NaN logits, out-of-range ids, uniforms of 7) past each bonus position.
    for dtype in DTYPES:
        for with_ref in (0, 1):
            add(f"ragged-{dtype}-ref{with_ref}", dtype=dtype, B=5, K=4, V=111, temp=0.7, ref=with_ref, ragged=1, seed=7)
            add(f"ragged-topk-{dtype}-ref{with_ref}", dtype=dtype, B=5, K=4, V=111, temp=1.0, top_k=5, top_p=0.9, ref=with_ref,
                ragged=1, seed=8)
        add(f"ragged-greedy-{dtype}", dtype=dtype, B=5, K=4, V=111, temp=0.0, ref=1, ragged=1, seed=9)
        add(f"ragged-trunc-{dtype}", dtype=dtype, B=3, K=3, V=6144, temp=1.0, top_k=3000, top_p=0.7, ref=0, ragged=1,
            pattern="close", seed=10)
    # Misaligned rows (one element past a 16-byte boundary), vocabularies that are not whole vectors.
    for dtype in DTYPES:
        for vocab in (111, 6147):
            add(f"misaligned-{dtype}-V{vocab}", dtype=dtype, B=2, K=3, V=vocab, temp=1.0, top_k=5 if vocab > 1000 else 0,
                ref=1, misalign=1, seed=11)
    # Masked, constant and invalid rows; greedy ties; paper mode on flat rows.
    for dtype in DTYPES:
        add(f"masked-{dtype}", dtype=dtype, B=3, K=3, V=111, temp=1.0, ref=0, pattern="masked", finite=3, seed=12)
        add(f"invalid-{dtype}", dtype=dtype, B=4, K=2, V=111, temp=1.0, ref=1, poison=2, seed=13)
        add(f"greedy-constant-{dtype}", dtype=dtype, B=2, K=3, V=111, temp=0.0, ref=1, pattern="constant")
        add(f"greedy-flat-{dtype}", dtype=dtype, B=3, K=3, V=4099, temp=0.0, ref=1, pattern="flat", seed=14)
        add(f"paper-flat-{dtype}", dtype=dtype, B=3, K=3, V=111, temp=1.0, ref=1, paper=1, shift=0.5, pattern="flat", seed=15)
    # One-hot drafts (a deterministic proposer): sd with no draft tensor at all, the tilt with
    # r only in the tilt; plain, truncated (the bucketed selection without a proposal stream),
    # ragged, greedy.
    for dtype in DTYPES:
        for with_ref in (0, 1):
            common = dict(dtype=dtype, ref=with_ref, one_hot=1, shift=1.5)
            add(f"onehot-{dtype}-ref{with_ref}", **common, B=4, K=3, V=111, temp=0.8, scale=1.0, seed=21)
            add(f"onehot-ragged-topk-{dtype}-ref{with_ref}", **common, B=5, K=4, V=111, temp=1.0, top_k=5, top_p=0.9, ragged=1,
                seed=22)
        add(f"onehot-trunc-{dtype}", dtype=dtype, ref=1, one_hot=1, B=2, K=2, V=6144, temp=1.0, top_k=3000, top_p=0.7,
            pattern="close", seed=23)
        add(f"onehot-greedy-{dtype}", dtype=dtype, ref=1, one_hot=1, B=3, K=3, V=111, temp=0.0, ragged=1, seed=24)
        add(f"onehot-accepts-{dtype}", dtype=dtype, ref=0, one_hot=1, B=32, K=3, V=3, temp=1.0, scale=0.5, seed=25)
    # Block verification: awkward vocabularies, ragged rows, truncation (also the bucketed
    # selection at V = 6144), one-hot drafts, shift 0, greedy (the token rule), invalid rows.
    for dtype in DTYPES:
        for with_ref in (0, 1):
            common = dict(dtype=dtype, ref=with_ref, block=1, shift=1.5)
            add(f"block-{dtype}-ref{with_ref}-V1", **common, B=3, K=3, V=1, temp=1.0, seed=31)
            add(f"block-{dtype}-ref{with_ref}-V99", **common, B=6, K=4, V=99, temp=1.0, scale=0.5, seed=32)
            add(f"block-ragged-topk-{dtype}-ref{with_ref}", **common, B=6, K=4, V=111, temp=1.0, top_k=5, top_p=0.9, ragged=1,
                scale=0.5, seed=33)
            add(f"block-onehot-{dtype}-ref{with_ref}", **common, one_hot=1, B=8, K=3, V=989, temp=0.8, scale=0.3, ragged=1,
                seed=34)
        add(f"block-shift0-{dtype}", dtype=dtype, ref=1, block=1, shift=0.0, B=5, K=3, V=989, temp=0.7, top_p=0.95, scale=0.5,
            seed=35)
        add(f"block-accepts-{dtype}", dtype=dtype, ref=0, block=1, B=64, K=4, V=3, temp=1.0, scale=0.3, seed=36)
        add(f"block-onehot-accepts-{dtype}", dtype=dtype, ref=0, one_hot=1, block=1, B=64, K=4, V=3, temp=1.0, scale=0.3,
            seed=37)
        add(f"block-greedy-{dtype}", dtype=dtype, ref=1, block=1, B=4, K=3, V=111, temp=0.0, ragged=1, seed=38)
        add(f"block-invalid-{dtype}", dtype=dtype, ref=1, block=1, B=4, K=3, V=111, temp=1.0, poison=2, seed=39)
    add("block-trunc-f32", dtype="f32", ref=1, block=1, B=2, K=3, V=6144, temp=1.0, top_k=3000, top_p=0.7, pattern="close",
        ragged=1, seed=40)
    add("block-misaligned-bf16", dtype="bf16", ref=1, block=1, B=3, K=3, V=6147, temp=1.0, misalign=1, scale=0.5, seed=41)
    # sample (K = 0).
    for dtype in DTYPES:
        add(f"sample-{dtype}", op="sample", dtype=dtype, B=3, V=111, temp=1.0, seed=16)
        add(f"sample-greedy-{dtype}", op="sample", dtype=dtype, B=3, V=111, temp=0.0, pattern="flat", seed=17)
        add(f"sample-topk-{dtype}", op="sample", dtype=dtype, B=3, V=6144, temp=0.7, top_k=5, top_p=0.8, seed=18)
        add(f"sample-invalid-{dtype}", op="sample", dtype=dtype, B=3, V=111, temp=1.0, poison=1, seed=19)
    add("sample-close-f32", op="sample", dtype="f32", B=1, V=6144, temp=1.0, top_k=3000, top_p=0.7, pattern="close")
    add("sample-misaligned-f32", op="sample", dtype="f32", B=2, V=6147, temp=1.0, misalign=1, seed=20)
    # Tree verification (K = max_nodes): every dtype x replacement x {ref, no ref, shift 0}
    # with the truncations, awkward vocabularies, temperatures and tree shapes rotated through.
    for d, dtype in enumerate(DTYPES):
        for replacement in (1, 0):
            for m, (with_ref, shift) in enumerate(TREE_TILTS):
                for t, (top_k, top_p) in enumerate(TRUNCATIONS):
                    k = d + 2 * replacement + m + t
                    add(f"tree-sweep-{dtype}-{'iid' if replacement else 'distinct'}-ref{with_ref}-s{shift}-k{top_k}-p{top_p}",
                        op="tree", dtype=dtype, B=3, K=TREE_NODES[k % len(TREE_NODES)], V=TREE_VOCABS[k % len(TREE_VOCABS)],
                        temp=TEMPERATURES[1 + k % 4], top_k=top_k, top_p=top_p, ref=with_ref, shift=shift,
                        replacement=replacement, shape=TREE_SHAPES[k % len(TREE_SHAPES)], seed=300 + 10 * d + 5 * replacement + m + t)
    for dtype in DTYPES:
        for replacement in (1, 0):
            common = dict(op="tree", dtype=dtype, replacement=replacement)
            tag = f"{dtype}-{'iid' if replacement else 'distinct'}"
            # Wide and random trees over a few tokens that accept, reject and draw from residuals.
            add(f"tree-accepts-wide-{tag}", **common, B=24, K=5, V=5, temp=1.0, ref=1, shift=2.0, shape="wide", scale=3.0, seed=41)
            add(f"tree-accepts-random-{tag}", **common, B=24, K=7, V=8, temp=1.0, ref=0, shape="random", scale=3.0, seed=42)
            # Ragged rows (garbage past each row's last node) and refused rows, greedy.
            add(f"tree-ragged-{tag}", **common, B=6, K=8, V=99, temp=0.8, top_k=20, top_p=0.9, ref=1, ragged=1, poison=3, seed=43)
            add(f"tree-greedy-{tag}", **common, B=4, K=6, V=111, temp=0.0, ref=1, ragged=1, seed=44)
        add(f"tree-misaligned-{dtype}", op="tree", dtype=dtype, B=2, K=4, V=111, temp=1.0, ref=1, misalign=1, seed=45)
    # The bucketed selection at tree nodes, and the fast exponentials.
    add("tree-trunc-close-f32", op="tree", dtype="f32", B=2, K=4, V=6144, temp=1.0, top_k=3000, top_p=0.7, ref=0, pattern="close",
        replacement=0, seed=46)
    add("tree-trunc-bf16", op="tree", dtype="bf16", B=2, K=5, V=6147, temp=0.7, top_k=5, top_p=0.9, ref=1, replacement=0, seed=47)
    return cases


CASES = build_cases()

# Paths the matrix must reach (driver.cpp's census).
REQUIRED_PATHS = ("collect", "collect_level2", "ties_counted", "ties_level2", "radix_plan", "radix_blocks", "minus_inf_kb",
                  "greedy", "exact_exp", "fast_exp", "invalid_rows", "ragged_rows", "rejections", "acceptances", "sample",
                  "block_partial", "tree", "tree_rejections", "tree_residual_draws")


def case_line(name: str, keys: dict) -> str:
    return " ".join([f"name={name}"] + [f"{k}={v}" for k, v in keys.items()])


# ---------------------------------------------------------------------------------------
# Building and running the driver.

@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    results: dict[str, str]  # case name -> "ok ..." / "FAIL ..."

    @property
    def fatal(self) -> str:
        return "\n".join(line for line in self.stdout.splitlines() if line.startswith("cuda_on_cpu:"))


def build_driver(kind: str, kernels: Path = KERNELS, tag: str = "") -> Path:
    """Compiles driver.cpp against `kernels` (a copy of csrc/kernels/ for planted defects);
    cached under build/cuda_on_cpu/ by the hash of every source and flag."""
    flags = ["-std=c++20", "-ffp-contract=off", "-pthread", "-DSSS_CPU_NO_MULTIVERSION", *FLAGS[kind]]
    sources = sorted(p for p in [*HARNESS.rglob("*"), *kernels.rglob("*")] if p.is_file() and p.suffix in (".h", ".cuh", ".cpp"))
    digest = hashlib.sha256(" ".join([CXX, *flags]).encode())
    for path in sources:
        digest.update(path.name.encode() + path.read_bytes())
    out = BUILD / f"{kind}{tag}-{digest.hexdigest()[:16]}"
    driver = out / "driver"
    if driver.exists():
        return driver
    for stale in BUILD.glob(f"{kind}{tag}-*"):  # earlier builds of this variant
        shutil.rmtree(stale, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    include = out / "include"  # kernels/ laid out as csrc/ has it, so "kernels/..." resolves to this copy
    include.mkdir(exist_ok=True)
    if not (include / "kernels").exists():
        shutil.copytree(kernels, include / "kernels")
    command = [CXX, *flags, f"-I{HARNESS / 'include'}", f"-I{HARNESS}", f"-I{include}", str(HARNESS / "driver.cpp"), "-o", str(driver)]
    built = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, f"driver build failed:\n{' '.join(command)}\n{built.stderr[-4000:]}"
    return driver


def run_driver(driver: Path, names, timeout: float = 1800.0) -> Run:
    text = "\n".join(case_line(name, CASES[name]) for name in names) + "\n"
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1",
               TSAN_OPTIONS="halt_on_error=1:exitcode=66")
    done = subprocess.run([str(driver)], input=text, capture_output=True, text=True, timeout=timeout, env=env)
    results = {}
    for line in done.stdout.splitlines():
        match = re.match(r"(ok|FAIL) (\S+)", line)
        if match:
            results[match.group(2)] = line
    return Run(done.returncode, done.stdout, done.stderr, results)


def mutated_kernels(tmp: Path, file: str, old: str, new: str) -> Path:
    """A copy of csrc/kernels/ with `old` replaced by `new` (exactly once) in `file`."""
    copy = tmp / "kernels"
    shutil.copytree(KERNELS, copy)
    path = copy / file
    text = path.read_text()
    assert text.count(old) == 1, f"planted defect: {old!r} must occur once in {file}"
    path.write_text(text.replace(old, new))
    return copy


def case_result(run: Run, name: str) -> None:
    line = run.results.get(name)
    assert line is not None, f"the driver ended before case {name}: exit {run.returncode}\n{run.fatal}\n{run.stderr[-3000:]}"
    assert line.startswith("ok "), line


def census(run: Run) -> dict[str, int]:
    totals: dict[str, int] = {}
    for line in run.results.values():
        match = re.search(r"paths=(\S+)", line)
        if match and match.group(1) != "none":
            for item in match.group(1).split(","):
                key, count = item.split(":")
                totals[key] = totals.get(key, 0) + int(count)
    return totals


# Planted defects (each in a copy of csrc/kernels/).
RACE = ("cuda/bucket_select.cuh", "  } else if (ties) {", "  } else if (!use_radix) {")  # the tie branch as it was
MISSING_BARRIER = ("cuda/device_utils.cuh", "  if (lane == 0) scratch[warp] = value;\n  __syncthreads();",
                   "  if (lane == 0) scratch[warp] = value;")
ONE_HOT_RESIDUAL = ("cuda/draw.cuh", "one_hot ? (v == one_hot_token ? 0.0 : scaled_p)", "one_hot ? scaled_p")  # x not removed
# Block verification's threshold h_i = p_i (the residual mass R_i forgotten).
BLOCK_THRESHOLD = ("cuda/draw.cuh", "i < num_draft ? block_threshold(pr.block_masses[b * pr.positions() + i], weight_i) : weight_i",
                   "weight_i")
TREE_KEEPS_REJECTED = ("cuda/tree.cuh", "remaining[v] = v == x ? 0.0 : q;", "remaining[v] = q;")  # q keeps the rejected token
READ_PAST_ROW = ("cuda/device_utils.cuh", "words[w] = v < vocab ? element_bits(row, v)", "words[w] = v <= vocab ? element_bits(row, v)")


@pytest.fixture(scope="module")
def plain_run() -> Run:
    return run_driver(build_driver("plain"), CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_source_matches_cpu_kernel(plain_run, name):
    case_result(plain_run, name)


def test_every_path_is_reached(plain_run):
    totals = census(plain_run)
    print("\npath census over", len(plain_run.results), "cases:", ", ".join(f"{k} {v}" for k, v in sorted(totals.items())))
    missing = [path for path in REQUIRED_PATHS if totals.get(path, 0) == 0]
    assert not missing, f"paths no case reached: {missing}; census {totals}"


def test_the_resolve_race_case_reaches_the_radix_fallback(plain_run):
    """The cases that found the barrier race settle through the level-2 tie plan and the radix descent."""
    for name in ("trunc-close-p999-f32-keep", "trunc-close-p7-f32-keep"):
        line = plain_run.results[name]
        assert "ties_level2" in line and "radix_blocks" in line, line


# Each truncation-path case's plan and whether the radix descent runs (census keys); float32
# close scores overflow a level-2 bucket with several scores, in bfloat16 they round to one.
EXPECTED_PLANS = {"collect": ({"collect"}, False), "refine": ({"collect_level2"}, False),
                  "constant": ({"ties_counted"}, False), "minus-inf": ({"collect", "minus_inf_kb"}, False),
                  "radix": ({"radix_plan"}, True), "close-f32": ({"ties_level2"}, True), "close-bf16": ({"ties_counted"}, False)}


def expected_plan(name: str):
    kind = name.split("-")[1]
    if kind == "close":
        return EXPECTED_PLANS[f"close-{name.split('-')[3]}"]
    return EXPECTED_PLANS["minus-inf" if kind == "minus" else kind]


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("trunc-")])
def test_each_truncation_case_takes_its_path(plain_run, name):
    """The bucketed selection settles each case by its planned path: the radix descent runs
    only where the plan calls for it (a worse plan still gives the right tokens, through the
    fallback, so only the census shows it)."""
    line = plain_run.results[name]
    paths = set(re.search(r"paths=(\S+)", line).group(1).replace(",", " ").replace(":", " ").split()[::2])
    plans, radix = expected_plan(name)
    assert plans <= paths and ("radix_blocks" in paths) == radix, (plans, radix, line)


def test_truncating_sweep_rows_need_no_radix_descent(plain_run):
    """Random rows (test_cuda.py's sweep) resolve among the collected candidates."""
    lines = [plain_run.results[n] for n, k in CASES.items() if n.startswith("sweep-") and k["temp"] > 0
             and (k["top_k"] > 0 or k["top_p"] < 1.0)]
    assert lines and not [line for line in lines if "radix_blocks" in line], lines


# Under the sanitizers (several times slower): every path and every dtype, without the sweep's
# bfloat16 / float16 rows and the truncation cases' duplicates across dtype and tie rule.
ASAN_CASES = [n for n in CASES if not n.startswith(("sweep-bf16", "sweep-f16", "tree-sweep-bf16", "tree-sweep-f16", "greedy-", "paper-"))
              and not (n.startswith("trunc-") and not n.endswith("-f32-keep"))]


@pytest.mark.slow
def test_under_address_and_undefined_behaviour_sanitizers():
    run = run_driver(build_driver("asan"), ASAN_CASES)
    assert "ERROR: AddressSanitizer" not in run.stderr and "runtime error" not in run.stderr, run.stderr[-6000:]
    failed = [line for line in run.results.values() if not line.startswith("ok ")]
    assert run.returncode == 0 and not failed and len(run.results) == len(ASAN_CASES), (run.fatal, failed, run.stderr[-3000:])
    reached = census(run)
    assert all(reached.get(path, 0) > 0 for path in REQUIRED_PATHS), reached


def build_mutants(tmp_path_factory, specs):
    """Builds the drivers of several planted defects concurrently (two compilers at a time)."""
    def one(spec):
        kind, (file, old, new), tag = spec
        return build_driver(kind, mutated_kernels(tmp_path_factory.mktemp(tag), file, old, new), tag="-" + tag)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(one, specs))


@pytest.fixture(scope="module")
def control_drivers(tmp_path_factory):
    race, barrier, one_hot, block, tree = build_mutants(
        tmp_path_factory, [("plain", RACE, "race"), ("plain", MISSING_BARRIER, "barrier"), ("plain", ONE_HOT_RESIDUAL, "one-hot"),
                           ("plain", BLOCK_THRESHOLD, "block"), ("plain", TREE_KEEPS_REJECTED, "tree")])
    return {"race": race, "barrier": barrier, "one_hot": one_hot, "block": block, "tree": tree}


def test_control_the_fixed_race_is_caught(control_drivers):
    """The resolve kernel as it was (branches on the shared flag thread 0 writes): barrier divergence."""
    run = run_driver(control_drivers["race"], ["trunc-close-p999-f32-keep"])
    assert run.returncode == 86 and "barrier divergence" in run.fatal, (run.returncode, run.stdout[-2000:])


def test_one_hot_cases_accept_and_reject(plain_run):
    """The one-hot cases reach both outcomes of the acceptance test p*(x) on every dtype."""
    for dtype in DTYPES:
        line = plain_run.results[f"onehot-accepts-{dtype}"]
        assert "acceptances:" in line and "rejections:" in line, line


def test_control_one_hot_residual_keeping_the_draft_is_caught(control_drivers):
    """One-hot drafts corrected from p* instead of p* without the rejected draft: wrong rows."""
    names = [n for n in CASES if n.startswith("onehot-accepts-")]
    run = run_driver(control_drivers["one_hot"], names)
    assert any(line.startswith("FAIL") for line in run.results.values()), run.stdout[-2000:]


def test_block_cases_accept_partial_prefixes(plain_run):
    """The block cases accept a prefix strictly between 0 and n drafts on every dtype, where the
    thresholds h_i (not only p_n) decide."""
    for dtype in DTYPES:
        for name in (f"block-accepts-{dtype}", f"block-onehot-accepts-{dtype}"):
            line = plain_run.results[name]
            assert "block_partial:" in line and "rejections:" in line, line


def test_control_block_threshold_without_residual_mass_is_caught(control_drivers):
    """Block verification with h_i = p_i in the CUDA source: rows differ from the CPU kernel."""
    names = [n for n in CASES if n.startswith(("block-accepts-", "block-onehot-accepts-"))]
    run = run_driver(control_drivers["block"], names)
    assert any(line.startswith("FAIL") for line in run.results.values()), run.stdout[-2000:]


def test_tree_cases_accept_reject_and_draw_from_residuals(plain_run):
    """The tree cases that the controls rely on reach every outcome of the walk in each dtype and mode."""
    for name in [n for n in CASES if n.startswith("tree-accepts-")]:
        line = plain_run.results[name]
        assert all(f"{key}:" in line for key in ("acceptances", "tree_rejections", "tree_residual_draws")), line


def test_control_tree_without_replacement_keeping_the_rejected_token_is_caught(control_drivers):
    """Siblings drawn without replacement, q not losing the rejected token: wrong rows."""
    names = [n for n in CASES if n.startswith("tree-accepts-") and n.endswith("-distinct")]
    run = run_driver(control_drivers["tree"], names)
    assert any(line.startswith("FAIL") for line in run.results.values()), run.stdout[-2000:]


def test_control_missing_barrier_is_caught(control_drivers):
    """block_reduce without the barrier between the warp results and their sum: wrong rows."""
    names = ["sweep-f32-exact-k0-p1.0", "trunc-collect-f32-keep", "ragged-f32-ref1"]
    run = run_driver(control_drivers["barrier"], names)
    assert run.returncode != 0 and any(line.startswith("FAIL") for line in run.results.values()), run.stdout[-2000:]


@pytest.mark.slow
def test_control_read_past_a_row_is_caught_by_asan(tmp_path_factory):
    (driver,) = build_mutants(tmp_path_factory, [("asan", READ_PAST_ROW, "oob")])
    run = run_driver(driver, ["sweep-f32-exact-k0-p1.0", "misaligned-f32-V111"])
    assert run.returncode != 0 and "heap-buffer-overflow" in run.stderr, run.stderr[-3000:]


tsan = pytest.mark.skipif(not TSAN, reason="ThreadSanitizer runs take minutes: set SSS_CUDA_ON_CPU_TSAN=1")
TSAN_CASES = ["ragged-topk-f32-ref1", "trunc-constant-k-f32-keep", "ragged-f32-ref1", "sample-topk-f32"]


@tsan
@pytest.mark.slow
def test_under_thread_sanitizer():
    run = run_driver(build_driver("tsan"), TSAN_CASES, timeout=3600)
    assert "WARNING: ThreadSanitizer" not in run.stderr, run.stderr[-6000:]
    assert run.returncode == 0 and all(run.results[n].startswith("ok ") for n in TSAN_CASES), (run.fatal, run.stderr[-3000:])


@tsan
@pytest.mark.slow
def test_control_shared_memory_race_is_caught_by_tsan(tmp_path_factory):
    (driver,) = build_mutants(tmp_path_factory, [("tsan", MISSING_BARRIER, "tsan-barrier")])
    run = run_driver(driver, ["sweep-f32-exact-k0-p1.0"], timeout=3600)
    assert "WARNING: ThreadSanitizer: data race" in run.stderr, run.stderr[-3000:]
