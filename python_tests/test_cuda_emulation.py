"""CPU-side emulation of the CUDA kernels' arithmetic (csrc/kernels/cuda), runnable without a
GPU: each test re-implements one device routine in NumPy / exact Python arithmetic, with the
constants read from the CUDA sources, and checks the property the kernels rely on. Every test
also runs a negative control (the previous or a plausible wrong rule) that must fail it."""

from __future__ import annotations

import itertools
import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "kernels" / "cuda"
DEVICE_UTILS = (CUDA_DIR / "device_utils.cuh").read_text()
VERIFY = (CUDA_DIR / "verify.cuh").read_text()
LAUNCH_IMPL = (CUDA_DIR / "launch_impl.cuh").read_text()
ROW_OPS = (ROOT / "csrc" / "kernels" / "cpu" / "row_ops.h").read_text()


def constant(source: str, name: str) -> float:
    """Value of `constexpr ... name = value;` or `const double name = value;` in a source file."""
    match = re.search(rf"\b{name}\s*=\s*([-+0-9.eE]+)", source)
    assert match, f"{name} not found"
    return float(match.group(1))


# ---------------------------------------------------------------------------------------
# exp: one flush rule for the CPU and CUDA kernels


def fma(a: float, b: float, c: float) -> float:
    """Correctly rounded a * b + c (the device's __fma_rn)."""
    return float(Fraction(a) * Fraction(b) + Fraction(c))


def cuda_fast_exp(x: float, flush: float) -> float:
    """fast_exp of device_utils.cuh: table of 2^(j/64), degree-5 polynomial, flush below `flush`."""
    if not (x >= flush):
        return 0.0
    scale, ln2_hi, ln2_lo, shifter = (constant(DEVICE_UTILS, n) for n in ("kScale", "kLn2Hi", "kLn2Lo", "kShifter"))
    shifted = fma(x, scale, shifter)
    k = shifted - shifter
    n = int(k)
    r = fma(-k, ln2_hi, x)
    r = fma(-k, ln2_lo, r)
    p = 1.0 / 120.0
    for c in (1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
        p = fma(p, r, c)
    t = 2.0 ** ((n & 63) / 64.0) * p
    e = n >> 6
    if e < -1022 and flush >= -708.0:
        return float("nan")  # the device builds 2^e as a normal double: unreachable above the flush
    return t * 2.0**e  # (the previous rule scaled subnormal results in two steps)


CPU_FLUSH = float(re.search(r"x < (-[0-9.]+) \? -?[0-9.]+ : x", ROW_OPS).group(1))


def cpu_exp_nonpositive(x: float) -> float:
    """exp_nonpositive of csrc/kernels/cpu/row_ops.h: 2^k times a Taylor polynomial of the
    reduced argument, 0 below its flush threshold (and for -inf)."""
    clamped = max(x, CPU_FLUSH)
    shifted = clamped * 1.4426950408889634 + 6755399441055744.0
    k = shifted - 6755399441055744.0
    r = (clamped - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10
    p = sum(r**j / math.factorial(j) for j in range(14))
    return 0.0 if x < CPU_FLUSH else p * 2.0 ** int(k)


def test_exp_flush_rule_matches_cpu():
    """fast_exp (CUDA) and exp_nonpositive (CPU) return 0 exactly for x < -708 (and -inf) and
    agree with exp to a few ulp elsewhere, so both kernels see the same zero weights."""
    cuda_flush = constant(DEVICE_UTILS, "kExpFlush")
    assert cuda_flush == CPU_FLUSH == -708.0
    below = math.nextafter(cuda_flush, -math.inf)
    xs = [0.0, -1e-300, -0.5, -1.0, -20.3, -100.0, -707.9, cuda_flush, below, -708.5, -744.0, -745.5, -800.0, -math.inf]
    xs += list(np.linspace(-708, 0, 400))
    for x in xs:
        cuda, cpu = cuda_fast_exp(x, cuda_flush), cpu_exp_nonpositive(x)
        assert (cuda == 0.0) == (cpu == 0.0) == (x < cuda_flush), (x, cuda, cpu)
        if x >= cuda_flush:
            exact = math.exp(x)
            assert abs(cuda - exact) <= 4 * math.ulp(exact), (x, cuda, exact)
    # Negative control: the previous device rule kept subnormal results down to e^-745.
    assert cuda_fast_exp(-720.0, -745.0) > 0.0 and cpu_exp_nonpositive(-720.0) == 0.0


# ---------------------------------------------------------------------------------------
# Normalisers at low temperature: float64 scores, float32 exp of the float64 difference


def ex2_f32(t: np.ndarray) -> np.ndarray:
    """ex2.approx.ftz.f32 to within its ~2 ulp: float32 exp2 of a float32 argument."""
    return np.exp2(t.astype(np.float32)).astype(np.float32)


def log_sum_fast(scores: np.ndarray, vec: int = 8) -> float:
    """The stats kernel's fast path for one row: max, then per 16-byte vector a float32 sum of
    ex2.approx(float32((s - max) * log2 e)) added to a float64 total. Returns log(sum)."""
    top = scores.max()
    t = ((scores - top) * 1.4426950408889634).astype(np.float32)
    terms = ex2_f32(t)
    pad = (-len(terms)) % vec
    per_vector = np.concatenate([terms, np.zeros(pad, np.float32)]).reshape(-1, vec)
    sums = np.zeros(per_vector.shape[0], np.float32)
    for e in range(vec):  # float32 additions in element order
        sums = (sums + per_vector[:, e]).astype(np.float32)
    return math.log(float(np.sum(sums.astype(np.float64))))


def log_total_float32_scores(zq, zr, zd, tau, shift) -> float:
    """Negative control, the previous fast path: the untempered tilted logit zq + shift (zr - zd)
    in float32, then fma(x, c_lo, fma(x, c_hi, -m)) with c_hi + c_lo = log2(e) / tau in float32
    and m = float32(max * c_hi). Returns m ln 2 + log(sum of 2^t), the natural-log normaliser."""
    f32 = np.float32
    s32 = (zq + f32(shift) * (zr - zd)).astype(f32)
    scale = 1.4426950408889634 / tau
    hi = f32(scale)
    lo = f32(scale - float(hi))
    m = f32(s32.max() * hi)
    t = (s32.astype(np.float64) * float(hi) - float(m)).astype(f32)  # products of two floats are exact in float64
    t = (s32.astype(np.float64) * float(lo) + t.astype(np.float64)).astype(f32)
    return float(m) * math.log(2.0) + math.log(float(np.sum(ex2_f32(t).astype(np.float64))))


@pytest.mark.parametrize("tau", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float64_score_path_error_is_float32_rounding_at_low_temperature(tau, dtype):
    """V = 128256 logits with a reference: the log-normaliser of p* from float64 scores and
    float32 exp of the float64 difference is within float32 rounding of the float64 value at
    every temperature, while the previous float32-score path (control, float32 logits) errs by
    ~ulp(score) / tau."""
    vocab, shift = 128256, 0.7
    worst_new = worst_old = 0.0
    for seed in range(3):
        rng = np.random.default_rng(seed)
        cast = (lambda x: (x.astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)) if dtype == "bfloat16" else (
            lambda x: x.astype(np.float32))
        zq = cast(4.0 * rng.standard_normal(vocab))
        zr = cast(zq + 0.7 * rng.standard_normal(vocab))
        zd = cast(zr + 0.7 * rng.standard_normal(vocab))
        inv = 1.0 / tau
        s = zq.astype(np.float64) * inv + shift * (zr.astype(np.float64) * inv - zd.astype(np.float64) * inv)
        top = s.max()
        exact = math.log(float(np.sum(np.exp(s - top))))
        fast = log_sum_fast(s)
        worst_new = max(worst_new, abs(fast - exact))
        assert math.exp((s.max() - top) - fast) <= 1.0 + 1e-6  # p* of the top token, the kernels' form
        worst_old = max(worst_old, abs(log_total_float32_scores(zq, zr, zd, tau, shift) - (top + exact)))
    assert worst_new < 1e-6, (tau, worst_new)
    if tau <= 0.01 and dtype == "float32":
        assert worst_old > 1e-5, worst_old  # the control fails the bound the new path meets


def test_separate_max_and_log_sum_keep_probabilities_at_huge_scores():
    """p*(v) = exp((s_v - s_max) - ls): two tied tokens at a scaled score of 1e17 get 1/2 each;
    adding max and log-sum first (s_v - (s_max + ls)) loses ls and gives 1 each."""
    s = np.array([1e17, 1e17, 1e17 - 1e3])
    top = s.max()
    ls = math.log(float(np.sum(np.exp(s - top))))
    separate = np.exp((s - top) - ls)
    assert np.allclose(separate, [0.5, 0.5, 0.0])
    combined = np.exp(s - (top + ls))
    assert not np.allclose(combined, separate)


def test_paper_residual_is_proportional_and_finite():
    """Paper-mode residual max(0, p* - exp(log r~ - log Z)) is (Z p* - r~)+ / Z, also when Z
    overflows float64 (log Z = 800)."""
    rng = np.random.default_rng(1)
    log_p = np.log(rng.dirichlet(np.ones(50)))
    log_r = np.log(rng.dirichlet(np.ones(50)))
    for log_z in (-0.3, 0.0, 0.4):
        weight = np.maximum(0.0, np.exp(log_p) - np.exp(np.minimum(log_r - log_z, 0.0)))
        direct = np.maximum(0.0, math.exp(log_z) * np.exp(log_p) - np.exp(log_r))
        np.testing.assert_allclose(weight * math.exp(log_z), direct, rtol=1e-12, atol=1e-15)
    weight = np.maximum(0.0, np.exp(log_p) - np.exp(np.minimum(log_r - 800.0, 0.0)))
    assert np.all(np.isfinite(weight)) and np.allclose(weight, np.exp(log_p), rtol=1e-12)


# ---------------------------------------------------------------------------------------
# Chunking and launch: sizes only, no device queries


def test_launch_path_queries_nothing_from_the_device():
    """Grid sizes are functions of the problem sizes: no SM count, occupancy or attribute query
    (different GPUs would chunk differently, and a first call inside a graph capture would
    query during the capture)."""
    for pattern in ("cudaDeviceGetAttribute", "cudaOccupancy", "MultiProcessorCount", "cudaGetDevice", "cudaFuncGetAttributes"):
        assert pattern not in LAUNCH_IMPL, pattern
    assert "SSS_EXT_HOST_EMULATION" not in LAUNCH_IMPL + VERIFY + DEVICE_UTILS


@pytest.mark.parametrize("itemsize,vec", [(4, 4), (2, 8)])
@pytest.mark.parametrize("vocab", [1, 7, 99, 111, 989, 50272, 128256, 2**31 - 1])
def test_fixed_chunks_tile_the_vocabulary(itemsize, vec, vocab):
    """Stats chunks of kSplitVectors 16-byte vectors and draw chunks tile [0, V) exactly once
    and depend only on V and the element size."""
    split_vectors = int(constant(VERIFY, "kSplitVectors"))
    draw_threads = int(constant(VERIFY, "kDrawThreads"))
    max_draw = int(constant(VERIFY, "kMaxDrawSplits"))
    vectors = (vocab + vec - 1) // vec
    splits = max(1, (vectors + split_vectors - 1) // split_vectors)
    covered = 0
    for split in range(splits):
        begin, end = split * split_vectors, min(vectors, split * split_vectors + split_vectors)
        assert begin == covered and end > begin
        covered = end
    assert covered * vec >= vocab > (covered - 1) * vec
    draw = min(max(1, (vectors + 2 * draw_threads - 1) // (2 * draw_threads)), max_draw)
    per_chunk = (vectors + draw - 1) // draw
    ranges = [(min(vectors, c * per_chunk), min(vectors, min(vectors, c * per_chunk) + per_chunk)) for c in range(draw)]
    assert ranges[0][0] == 0 and ranges[-1][1] == vectors
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


# ---------------------------------------------------------------------------------------
# Misaligned rows: per-stream 16-byte loads with a byte shift


def shift_bytes(lo: list[int], hi: list[int], offset: int) -> list[int]:
    """device_utils.cuh shift_bytes: 16 bytes at byte `offset` of the 32 bytes lo:hi (words)."""
    w = lo + hi
    shift, q = (offset % 4) * 8, offset // 4
    return [((w[q + i + 1] << 32 | w[q + i]) >> shift) & 0xFFFFFFFF for i in range(4)]


def emulate_load_vector(memory: bytes, row: int, itemsize: int, vocab: int, v0: int, touched: list):
    """device_utils.cuh load_vector: the kVec elements at v0 (as bytes, -inf padding past the row),
    recording every byte range read from `memory`."""
    vec = 16 // itemsize
    skew = row % 16
    neg_inf = (0xFF800000).to_bytes(4, "little") if itemsize == 4 else (0xFF80).to_bytes(2, "little")
    word = lambda at: int.from_bytes(memory[at : at + 4], "little")  # noqa: E731
    if v0 + vec <= vocab and skew % itemsize == 0:
        if skew == 0:
            touched.append((row + v0 * itemsize, 16))
            return memory[row + v0 * itemsize : row + v0 * itemsize + 16]
        lead = skew // itemsize
        if v0 - lead >= 0 and v0 - lead + 2 * vec <= vocab:
            base = row + (v0 - lead) * itemsize
            assert base % 16 == 0
            touched.append((base, 32))
            words = shift_bytes([word(base + 4 * i) for i in range(4)], [word(base + 16 + 4 * i) for i in range(4)], skew)
            return b"".join(x.to_bytes(4, "little") for x in words)
    out = b""
    for v in range(v0, v0 + vec):
        if v < vocab:
            touched.append((row + v * itemsize, itemsize))
            out += memory[row + v * itemsize : row + (v + 1) * itemsize]
        else:
            out += neg_inf
    return out


@pytest.mark.parametrize("itemsize", [4, 2])
def test_misaligned_row_loads_return_the_row(itemsize):
    """Every row offset and awkward V: the emulated loads return exactly the row's elements
    (-inf past the end), read nothing outside the row, and use 16-byte loads for all but at
    most two vectors at each end of a misaligned row."""
    rng = np.random.default_rng(2)
    vec = 16 // itemsize
    for vocab, offset in itertools.product((1, 7, 8, 9, 99, 111, 989), range(0, 16, itemsize)):
        memory = bytes(rng.integers(0, 256, 64 + vocab * itemsize + 64, dtype=np.uint8))
        row = 64 + offset
        touched = []
        data = b"".join(emulate_load_vector(memory, row, itemsize, vocab, k * vec, touched) for k in range((vocab + vec - 1) // vec))
        assert data[: vocab * itemsize] == memory[row : row + vocab * itemsize], (vocab, offset)
        assert all(row <= a and a + n <= row + vocab * itemsize for a, n in touched), (vocab, offset)
        scalar_vectors = sum(1 for _, n in touched if n == itemsize) / vec
        assert scalar_vectors <= 3, (vocab, offset, scalar_vectors)
    # Negative control: a byte shift that takes the wrong word of the pair breaks the row.
    lo, hi = [1, 2, 3, 4], [5, 6, 7, 8]
    assert shift_bytes(lo, hi, 4) == [2, 3, 4, 5] and shift_bytes(lo, hi, 4) != shift_bytes(lo, hi, 0)


# ---------------------------------------------------------------------------------------
# Top-p histogram masses: a fixed reduction order


def per_warp_then_fixed(masses: np.ndarray, buckets: np.ndarray, warps: int, order) -> np.ndarray:
    """The truncation kernel's scheme: each warp sums its lanes' masses into its own histogram
    row in its iteration order (warp arrival order `order` cannot matter), then rows are summed
    in warp order."""
    rows = np.zeros((warps, 256))
    for w in order:  # arrival order of warps: irrelevant by construction
        for index in range(w, len(masses), warps):
            rows[w, buckets[index]] += masses[index]
    total = np.zeros(256)
    for w in range(warps):
        total = total + rows[w]
    return total


def atomic_in_arrival_order(masses, buckets, warps, order) -> np.ndarray:
    """The previous scheme: shared atomicAdd in whatever order warps arrive."""
    total = np.zeros(256)
    chunks = [list(range(w, len(masses), warps)) for w in range(warps)]
    for step in range(max(len(c) for c in chunks)):
        for w in order:
            if step < len(chunks[w]):
                index = chunks[w][step]
                total[buckets[index]] += masses[index]
    return total


def test_top_p_bucket_masses_do_not_depend_on_warp_order():
    rng = np.random.default_rng(3)
    masses = np.exp(-rng.exponential(3.0, 4096))
    buckets = rng.integers(250, 256, 4096)  # scores cluster in few buckets
    warps = 8
    orders = [list(rng.permutation(warps)) for _ in range(20)]
    fixed = [per_warp_then_fixed(masses, buckets, warps, o) for o in orders]
    assert all(np.array_equal(fixed[0], f) for f in fixed[1:])
    arrival = [atomic_in_arrival_order(masses, buckets, warps, o) for o in orders]
    assert not all(np.array_equal(arrival[0], a) for a in arrival[1:]), "control: arrival order changes the bits"


# ---------------------------------------------------------------------------------------
# Top-k / top-p kept sets: the radix descent (radix_truncation, the bucketed selection's fallback)


def order_key(scores: np.ndarray) -> np.ndarray:
    """verify.cuh order_key: float64 -> uint64 whose unsigned order is the float order (-0 = +0)."""
    bits = (scores + 0.0).view(np.uint64)
    negative = (bits >> np.uint64(63)) == 1
    return np.where(negative, ~bits, bits | np.uint64(1 << 63))


def score_of_key(key: int) -> float:
    bits = (key & ~(1 << 63)) if key >> 63 else (~key & (2**64 - 1))
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])


def key_digit(hi: np.ndarray, lo: np.ndarray, digit: int) -> np.ndarray:
    if digit < 8:
        return ((hi >> np.uint64(56 - 8 * digit)) & np.uint64(0xFF)).astype(np.int64)
    return ((lo >> np.uint64(24 - 8 * (digit - 8))) & np.uint64(0xFF)).astype(np.int64)


def prefix_matches(hi, lo, prefix: tuple[int, int], digit: int) -> np.ndarray:
    if digit == 0:
        return np.ones(hi.shape, dtype=bool)
    if digit <= 8:
        shift = np.uint64(64 - 8 * digit)
        return (hi >> shift) == np.uint64(prefix[0] >> (64 - 8 * digit))
    same_hi = hi == np.uint64(prefix[0])
    if digit == 12:
        return same_hi
    shift = np.uint64(32 - 8 * (digit - 8))
    return same_hi & ((lo >> shift) == np.uint64(prefix[1] >> (32 - 8 * (digit - 8))))


def set_digit(key: tuple[int, int], digit: int, value: int) -> tuple[int, int]:
    hi, lo = key
    if digit < 8:
        shift = 56 - 8 * digit
        return (hi & ~(0xFF << shift)) | (value << shift), lo
    shift = 24 - 8 * (digit - 8)
    return hi, (lo & ~(0xFF << shift)) | (value << shift)


def descend(scores, hi, lo, floor, prefix, start_digit, by_mass, rank, top_p, max_score, tie_low_index=True, skip=True,
            passes=None):
    """verify.cuh descend (radix_truncation): the rank key (order_key(score), 0xffffffff - index) of the token of
    0-based rank `rank` (counts) or of the last token whose preceding mass is < top_p * total.
    `skip`: jump over the digits every candidate of the chosen bucket shares (AND == OR)."""
    vocab = len(scores)
    mass_all = np.exp(scores - max_score)
    candidate = (hi > np.uint64(floor[0])) | ((hi == np.uint64(floor[0])) & (lo >= np.uint64(floor[1])))
    digit, done = start_digit, start_digit >= 12
    count_above, mass_above, target = 0, 0.0, 0.0
    while not done:
        if passes is not None:
            passes.append(digit)
        member = candidate & prefix_matches(hi, lo, prefix, digit)
        bucket = key_digit(hi, lo, digit)
        count = np.bincount(bucket[member], minlength=256)
        mass = np.bincount(bucket[member], weights=mass_all[member], minlength=256)
        min_index = np.full(256, 2**32 - 1)
        np.minimum.at(min_index, bucket[member], np.arange(vocab)[member])
        if by_mass and digit == start_digit:
            target = top_p * float(sum(mass[j] for j in range(255, -1, -1)))
        chosen = -1
        if by_mass:
            running = above = mass_above
            for j in range(255, -1, -1):
                if count[j] == 0:
                    continue
                if not running < target:
                    break
                chosen, above = j, running
                running += mass[j]
            if chosen < 0:
                chosen = 255
                while chosen > 0 and count[chosen] == 0:
                    chosen -= 1
            mass_above = above
        else:
            running = count_above
            chosen = 255
            while chosen > 0:
                if running + count[chosen] > rank:
                    break
                running += count[chosen]
                chosen -= 1
            count_above = running
        following = set_digit(prefix, digit, chosen)
        next_digit = digit + 1
        in_bucket = member & (bucket == chosen)
        and_hi = int(np.bitwise_and.reduce(hi[in_bucket])) if in_bucket.any() else 2**64 - 1
        or_hi = int(np.bitwise_or.reduce(hi[in_bucket])) if in_bucket.any() else 0
        and_lo = int(np.bitwise_and.reduce(lo[in_bucket])) if in_bucket.any() else 2**32 - 1
        or_lo = int(np.bitwise_or.reduce(lo[in_bucket])) if in_bucket.any() else 0
        if count[chosen] == 1:
            v = int(min_index[chosen]) if tie_low_index else int(np.flatnonzero(in_bucket)[0])
            following = (int(hi[v]), int(lo[v]))
            done = True
        elif skip and and_hi != or_hi:
            following = (and_hi, following[1])
            next_digit = max(next_digit, (64 - (and_hi ^ or_hi).bit_length()) // 8)
        elif skip:
            following = (and_hi, and_lo)
            next_digit = max(next_digit, 8 + (32 - (and_lo ^ or_lo).bit_length()) // 8)
        prefix = following
        digit = next_digit
        done |= digit >= 12
    return prefix


def kept_by_radix(scores: np.ndarray, top_k: int, top_p: float, tie_low_index: bool = True, skip: bool = True,
                  passes: list | None = None, ties: str = "keep") -> np.ndarray:
    """The truncation kernel's kept set of one row (float64 masses, exact exp); `passes`
    collects the digit of every histogram pass; `ties` is the top-k tie rule (top_k_ties)."""
    vocab = len(scores)
    index = np.arange(vocab, dtype=np.uint64)
    hi = order_key(scores)
    lo = (np.uint64(0xFFFFFFFF) - index) if tie_low_index else index
    key_max, key_min = int(hi.max()), int(hi.min())
    max_score = scores.max()
    kept = (0, 0)
    if 0 < top_k < vocab:
        common = 64 if key_max == key_min else 64 - (key_max ^ key_min).bit_length()
        start = common // 8
        prefix = (0 if start == 0 else key_max & ((2**64 - 1) << (64 - 8 * start)) & (2**64 - 1), 0)
        kept = descend(scores, hi, lo, (0, 0), prefix, start, False, top_k - 1, 1.0, max_score, tie_low_index, skip, passes)
        if ties == "keep":
            kept = (kept[0], 0)  # every token with the k-th largest score
    if top_p < 1.0:
        low = max(kept[0], key_min)
        common = 64 if key_max == low else 64 - (key_max ^ low).bit_length()
        start = common // 8
        prefix = (0 if start == 0 else key_max & ((2**64 - 1) << (64 - 8 * start)) & (2**64 - 1), 0)
        kept = descend(scores, hi, lo, kept, prefix, start, True, 0, top_p, max_score, tie_low_index, skip, passes)
    threshold = score_of_key(kept[0])
    last_index = 0xFFFFFFFF - kept[1] if tie_low_index or kept[1] == 0 else kept[1]
    return (scores > threshold) | ((scores == threshold) & (np.arange(vocab) <= last_index))


@pytest.mark.parametrize("ties", ["keep", "exact-k"])
def test_radix_kept_sets_match_warp(ties):
    """The kernel's radix descent keeps exactly sss_ext.warp.kept_mask's tokens (rank by score,
    ties to the lower index; top-k under the tie rule, then top-p), on rows with heavy ties and
    -inf; the controls breaking ties to the higher index, and applying the other top-k tie
    rule, must differ somewhere."""
    torch = pytest.importorskip("torch")
    from sss_ext.warp import kept_mask

    other = {"keep": "exact-k", "exact-k": "keep"}[ties]
    rng = np.random.default_rng(4)
    control_differs = other_rule_differs = False
    for vocab in (1, 2, 7, 111, 1000, 3000):
        for kind in ("normal", "ties", "masked"):
            scores = 3.0 * rng.standard_normal(vocab)
            if kind == "ties":
                scores = np.round(scores * 2.0) / 2.0  # few distinct values: ranks decided by index
            if kind == "masked":
                scores[rng.random(vocab) < 0.5] = -np.inf
                scores[0] = 1.0
            for top_k, top_p in ((1, 1.0), (3, 1.0), (50, 1.0), (vocab - 1, 1.0), (0, 0.3), (0, 0.9), (0, 0.999),
                                 (20, 0.8), (5, 0.5)):
                if not ((0 < top_k < vocab) or top_p < 1.0):
                    continue
                expected = kept_mask(torch.tensor(scores, dtype=torch.float64), top_k, top_p, ties).numpy()
                got = kept_by_radix(scores, top_k, top_p, ties=ties)
                assert np.array_equal(got, expected), (vocab, kind, top_k, top_p)
                if kind == "ties" and vocab >= 111:
                    control_differs |= not np.array_equal(
                        kept_by_radix(scores, top_k, top_p, tie_low_index=False, ties=ties), expected)
                    other_rule_differs |= not np.array_equal(kept_by_radix(scores, top_k, top_p, ties=other), expected)
    assert control_differs and other_rule_differs


def test_radix_skips_shared_digits():
    """bfloat16 logits at V = 128256 (few distinct scores, many ties): skipping the digits the
    chosen bucket's candidates share keeps the kept sets and cuts the histogram passes per
    descent; the control without the skip walks every remaining byte."""
    torch = pytest.importorskip("torch")
    from sss_ext.warp import kept_mask

    rng = np.random.default_rng(5)
    logits = torch.tensor(3.0 * rng.standard_normal(128256)).to(torch.bfloat16).double().numpy()
    with_skip, without = [], []
    for top_k, top_p in ((50, 1.0), (0, 0.9), (1000, 0.95)):
        for tau in (1.0, 0.7):
            scores = logits * (1.0 / tau)
            expected = kept_mask(torch.tensor(scores), top_k, top_p).numpy()
            passes: list = []
            assert np.array_equal(kept_by_radix(scores, top_k, top_p, passes=passes), expected), (top_k, top_p, tau)
            with_skip.append(len(passes))
            passes = []
            assert np.array_equal(kept_by_radix(scores, top_k, top_p, skip=False, passes=passes), expected)
            without.append(len(passes))
    descents = [1 + (0 < k < 128256) * (p < 1.0) for k, p in ((50, 1.0), (0, 0.9), (1000, 0.95)) for _ in (1.0, 0.7)]
    assert max(n / d for n, d in zip(with_skip, descents)) <= 6, (with_skip, without)
    assert 2 * sum(with_skip) <= sum(without), (with_skip, without)  # measured: 40 passes against 88


# ---------------------------------------------------------------------------------------
# The chunked inverse-CDF draw (draw_kernel / draw_token)


def block_exclusive_sum(values: np.ndarray, threads: int) -> tuple[np.ndarray, float]:
    """device_utils.cuh block_exclusive_sum: warp Hillis-Steele scans, warp offsets in order."""
    inclusive = values.astype(np.float64).reshape(-1, 32).copy()
    offset = 1
    while offset < 32:
        shifted = np.zeros_like(inclusive)
        shifted[:, offset:] = inclusive[:, :-offset]
        inclusive = np.where(np.arange(32) >= offset, shifted + inclusive, inclusive)
        offset *= 2
    exclusive = np.zeros_like(inclusive)
    exclusive[:, 1:] = inclusive[:, :-1]
    warp_offsets, total = [], 0.0
    for w in range(threads // 32):
        warp_offsets.append(total)
        total = total + inclusive[w, -1]
    return (np.array(warp_offsets)[:, None] + exclusive).reshape(-1), total


def scan_chunk(weights: np.ndarray, begin: int, end: int, vec: int, threads: int):
    """scan_chunk: running sums over vectors [begin, end) of one chunk in the kernel's order;
    yields (v, running) for every token of positive weight, and returns the chunk total."""
    visits, carry = [], 0.0
    for tile in range(begin, end, threads):
        own = np.zeros(threads)
        ks = [tile + t for t in range(threads)]
        for t, k in enumerate(ks):
            if k < end:
                total = 0.0
                for e in range(vec):
                    total = total + weights[k * vec + e]
                own[t] = total
        exclusive, tile_total = block_exclusive_sum(own, threads)
        for t, k in enumerate(ks):
            if k >= end:
                continue
            running = carry + exclusive[t]
            for e in range(vec):
                running = running + weights[k * vec + e]
                if weights[k * vec + e] > 0:
                    visits.append((k * vec + e, running))
        carry = carry + tile_total
    return visits, carry


def chunked_inverse_cdf(weights: np.ndarray, u: float, vec: int, threads: int, max_splits: int, rescan_prefix: bool = True) -> int:
    """draw_kernel + draw_token for one weight vector (the residual kind is exercised the same way);
    rescan_prefix=False is a control that forgets the mass of the chunks before the selected one."""
    vocab = len(weights)
    vectors = (vocab + vec - 1) // vec
    padded = np.concatenate([weights, np.zeros(vectors * vec - vocab)])
    splits = min(max(1, (vectors + 2 * threads - 1) // (2 * threads)), max_splits)
    per_chunk = (vectors + splits - 1) // splits
    chunks = []
    for c in range(splits):
        begin = min(vectors, c * per_chunk)
        end = min(vectors, begin + per_chunk)
        visits, total = scan_chunk(padded, begin, end, vec, threads)
        peak = max((r for _, r in visits), default=-math.inf)
        last = max((v for v, _ in visits), default=-1)
        chunks.append((begin, end, total, peak, last))
    total = 0.0
    for chunk in chunks:
        total = total + chunk[2]
    threshold = u * total
    prefix, selected = 0.0, None
    for chunk in chunks:
        if prefix + chunk[3] > threshold:
            selected = chunk
            break
        prefix = prefix + chunk[2]
    token = max(chunk[4] for chunk in chunks)
    if selected is not None:
        visits, _ = scan_chunk(padded, selected[0], selected[1], vec, threads)
        before = prefix if rescan_prefix else 0.0
        token = next((v for v, running in visits if before + running > threshold), token)
    return token


def reference_inverse_cdf(weights: np.ndarray, u: float) -> tuple[int, float]:
    """sss_ext.reference.inverse_cdf in float64 (cumsum in vocabulary order), and the relative
    margin of u * total to the nearest running sum."""
    cumulative = np.cumsum(weights)
    threshold = u * cumulative[-1]
    index = int(np.searchsorted(cumulative, threshold, side="right"))
    if index >= len(weights):
        index = int(np.flatnonzero(weights > 0)[-1])
    return index, float(np.min(np.abs(cumulative - threshold)) / cumulative[-1])


@pytest.mark.parametrize("vocab", [1, 7, 300, 5000, 40000])
def test_chunked_inverse_cdf_matches_reference(vocab):
    """The draw's chunk totals / peaks and the rescan of one chunk emit the reference's token
    for every uniform except within float64 rounding of a running sum, including weights with
    zero runs and a trailing zero tail (the last-positive fallback at u -> 1)."""
    threads = int(constant(VERIFY, "kDrawThreads"))
    max_splits = int(constant(VERIFY, "kMaxDrawSplits"))
    rng = np.random.default_rng(vocab)
    weights = rng.exponential(1.0, vocab) * (rng.random(vocab) < 0.7)
    weights[-max(1, vocab // 10):] = 0.0
    weights[0] = max(weights[0], 0.5) if vocab == 1 else weights[0]
    if not weights.any():
        weights[0] = 1.0
    uniforms = list(rng.random(12)) + [1e-300, 0.5, 1.0 - 2.0**-53]
    for u in uniforms:
        got = chunked_inverse_cdf(weights, u, 8, threads, max_splits)
        expected, margin = reference_inverse_cdf(weights, u)
        assert got == expected or margin < 1e-12, (u, got, expected, margin)
        assert weights[got] > 0
    last_positive = int(np.flatnonzero(weights > 0)[-1])
    assert chunked_inverse_cdf(weights, 1.0 - 2.0**-53, 8, threads, max_splits) == last_positive
    if vocab >= 5000:  # several chunks: the control must miss some draws
        assert any(chunked_inverse_cdf(weights, u, 8, threads, max_splits, rescan_prefix=False) != reference_inverse_cdf(weights, u)[0]
                   for u in uniforms)


# ---------------------------------------------------------------------------------------
# Top-k / top-p kept sets: the bucketed selection (verify.cuh section 2b: histogram, plan,
# collect and resolve kernels), which replaced the per-row radix descent (kept above as the
# fallback, radix_truncation).

NUM_BUCKETS = int(constant(VERIFY, "kTruncBuckets"))
BUCKET_SCALE = constant(VERIFY, "kBucketScale")
CANDIDATES = int(constant(VERIFY, "kTruncCandidates"))
MASS_SCALE = constant(VERIFY, "kMassScale")
PLAN_SLACK = constant(VERIFY, "kPlanSlack")
CHUNK_VECTORS = int(constant(VERIFY, "kTruncChunkVectors"))
COLLECT, TIES, RADIX, REFINE = 0, 1, 2, 3


LINEAR_BUCKETS = int(constant(VERIFY, "kLinearBuckets"))
TAIL_SHIFT = int(constant(VERIFY, "kTailShift"))


def double_bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float64).view(np.uint64)


def score_bucket(scores: np.ndarray, max_score: float) -> np.ndarray:
    """verify.cuh score_bucket: non-increasing in the score, equal scores share a bucket."""
    scores = np.asarray(scores, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        d = max_score - scores
        scaled = d * BUCKET_SCALE
        linear = np.floor(np.where(scaled > 0.0, np.where(scaled < LINEAR_BUCKETS, scaled, 0.0), 0.0))
        finite = np.where(d < np.inf, d, 0.0)
        base = int(double_bits(np.array([LINEAR_BUCKETS / BUCKET_SCALE]))[0]) >> TAIL_SHIFT
        tail = (double_bits(np.abs(finite)) >> np.uint64(TAIL_SHIFT)).astype(np.int64) - base
        tail = LINEAR_BUCKETS + np.minimum(np.maximum(tail, 0), NUM_BUCKETS - 2 - LINEAR_BUCKETS)
        out = np.where(~(d < np.inf), NUM_BUCKETS - 1, np.where(scaled < LINEAR_BUCKETS, linear, tail))
    return out.astype(np.int64)


def fixed_mass(masses: np.ndarray) -> np.ndarray:
    """verify.cuh fixed_mass: floor(min(m, 1) * kMassScale), exact integers for the atomics."""
    return np.floor(np.minimum(masses, 1.0) * MASS_SCALE).astype(np.uint64)


def sub_bucket(scores: np.ndarray, max_score: float, bucket: int) -> np.ndarray:
    """verify.cuh sub_bucket: level-1 bucket `bucket` split by the next 11 bits of d."""
    d = max_score - np.asarray(scores, dtype=np.float64)
    if bucket >= LINEAR_BUCKETS:
        return ((double_bits(d) >> np.uint64(TAIL_SHIFT - 11)) & np.uint64(2047)).astype(np.int64)
    frac = (d * BUCKET_SCALE - float(bucket)) * float(NUM_BUCKETS)
    return np.where(frac > 0.0, np.floor(np.minimum(np.where(frac > 0.0, frac, 0.0), NUM_BUCKETS - 1)), 0).astype(np.int64)


def plan_key(scores: np.ndarray, max_score: float, plan: dict) -> np.ndarray:
    """verify.cuh plan_key: the bucket of each token in the plan's histogram (level 2: -1 before
    the refined bucket, kTruncBuckets after it)."""
    bucket = score_bucket(scores, max_score)
    if plan["level"] == 1:
        return bucket
    refined = plan["refined"]
    return np.where(bucket < refined, -1, np.where(bucket > refined, NUM_BUCKETS, sub_bucket(scores, max_score, refined)))


def make_plan(count, fixed, top_k: int, top_p: float, base: dict) -> dict:
    """verify.cuh make_plan (one thread, integer bounds converted to float64)."""
    nb = NUM_BUCKETS
    count = [int(c) for c in count]
    fixed = [int(f) for f in fixed]
    kb, count_above = base["kb_none"], 0
    if base["top_k"]:
        running = base["count0"]
        for b in range(nb):
            if running + count[b] > top_k - 1:
                kb, count_above = b, running
                break
            running += count[b]
    found = kb < nb
    last = kb if found else nb - 1
    p_lo = p_hi = kb
    if top_p < 1.0:
        w_lo = base["mass0_lo"] + sum(fixed[: kb if found else nb])
        w_hi = base["mass0_hi"] + sum(fixed[b] + count[b] for b in range(last + 1))
        if not found:
            w_lo += base["tail_lo"]
            w_hi += base["tail_hi"]
        t_lo = top_p * float(w_lo) * (1.0 - PLAN_SLACK) - 2.0
        t_hi = top_p * float(w_hi) * (1.0 + PLAN_SLACK) + 2.0
        p_lo = p_hi = -1
        below_lo, below_hi = base["mass0_lo"], base["mass0_hi"]
        for b in range(last + 1):
            through_hi = below_hi + fixed[b] + count[b]
            if count[b] != 0:
                if p_lo < 0 and float(through_hi) >= t_lo:
                    p_lo = b
                if float(below_lo) < t_hi:
                    p_hi = b
            below_lo += fixed[b]
            below_hi = through_hi
        if p_lo < 0:
            p_lo = p_hi
        p_hi = max(p_hi, p_lo)
    members = sum(count[b] for b in range(max(p_lo, 0), min(p_hi + 1, nb)))
    members_k = count[kb] if found and kb > p_hi else 0
    members += members_k
    below = base["tail_count"] + sum(count[max(p_hi + 1, 0):])
    one_bucket = p_lo == p_hi and (kb == p_hi or not found)
    if p_lo < 0 or members == 0:
        mode = RADIX
    elif members - members_k <= CANDIDATES and (members_k <= CANDIDATES or (base["kb_none"] == nb and kb == nb - 1)):
        mode = COLLECT  # each candidate group fits (a -inf kb group is not collected: mass 0)
    elif one_bucket and base["kb_none"] == nb and p_lo < nb - 2:
        mode = REFINE
    else:
        mode = TIES if one_bucket else RADIX
    return dict(kb=kb, count_above=count_above, p_lo=p_lo, p_hi=p_hi, members=members, members_k=members_k, below=below,
                mode=mode)


def level1_base(vocab: int, top_k: int) -> dict:
    return dict(count0=0, mass0_lo=0, mass0_hi=0, tail_count=0, tail_lo=0, tail_hi=0, top_k=0 < top_k < vocab,
                kb_none=NUM_BUCKETS)


def level2_base(count1, fixed1, plan1: dict) -> dict:
    """truncation_plan2_kernel: what lies before / after the refined bucket at level 1."""
    refined = plan1["p_lo"]
    count1 = [int(c) for c in count1]
    fixed1 = [int(f) for f in fixed1]
    before, after = range(refined), range(refined + 1, NUM_BUCKETS)
    return dict(count0=sum(count1[b] for b in before), mass0_lo=sum(fixed1[b] for b in before),
                mass0_hi=sum(fixed1[b] + count1[b] for b in before), tail_count=sum(count1[b] for b in after),
                tail_lo=sum(fixed1[b] for b in after), tail_hi=sum(fixed1[b] + count1[b] for b in after),
                top_k=plan1["kb"] == refined, kb_none=NUM_BUCKETS + 1)


def last_tied(cand_key, positions, r: int, ties: str) -> int:
    """Under "keep", the last of `positions` (rank order) whose key equals that of positions[r]."""
    while ties == "keep" and r + 1 < len(positions) and cand_key[positions[r + 1]] == cand_key[positions[r]]:
        r += 1
    return r


def resolve_candidates(plan, cand_bucket, cand_mass, cand_key, above, mid, top_k, top_p, ties="keep"):
    """verify.cuh resolve_candidates (and the separate kb group of the resolve kernel): the
    position (in rank order) of the last kept candidate and the kept mass, or None when the
    boundary is not among the candidates."""
    nb, kb, p_lo, p_hi = NUM_BUCKETS, plan["kb"], plan["p_lo"], plan["p_hi"]
    split = plan["members_k"] > 0
    k_sum = 0.0
    if split:  # the kb group, sorted apart: the mass of its top-k members in rank order
        in_k = np.flatnonzero(cand_bucket == kb)
        r = top_k - 1 - plan["count_above"]
        if r >= len(in_k):
            return None
        for j in in_k[: last_tied(cand_key, in_k, r, ties) + 1]:
            k_sum += cand_mass[j]
        keep = cand_bucket != kb
        cand_bucket, cand_mass, cand_key = cand_bucket[keep], cand_mass[keep], cand_key[keep]
    n = len(cand_bucket)
    in_p = (cand_bucket >= p_lo) & (cand_bucket <= p_hi)
    last_k = n - 1
    if kb < nb and not split:
        in_k = np.flatnonzero(cand_bucket == kb)
        r = top_k - 1 - plan["count_above"]
        if r >= len(in_k):
            return None
        last_k = int(in_k[last_tied(cand_key, in_k, r, ties)])
    if top_p >= 1.0:
        total = above
        for j in range(last_k + 1):
            total += cand_mass[j]
        return last_k, total
    w = above
    for j in range(last_k + 1):
        if in_p[j]:
            w += cand_mass[j]
    w += mid
    if split:
        w += k_sum
    for j in range(last_k + 1):
        if not split and kb > p_hi and cand_bucket[j] == kb:
            w += cand_mass[j]
    target = top_p * w
    running, last, stopped, any_p = above, -1, False, False
    for j in range(n):
        if not in_p[j]:
            continue
        if not any_p and not running < target:
            return None
        any_p = True
        if j > last_k or not running < target:
            stopped = True
            break
        last = j
        running += cand_mass[j]
    if not any_p or last < 0:
        return None
    more = (kb < nb and kb > p_hi) or (kb >= nb and plan["below"] > 0)
    if not stopped and more and running < target:
        return None
    total = above
    for j in range(last + 1):
        if in_p[j]:
            total += cand_mass[j]
    return last, total


def resolve_ties(plan, above, mid, m, top_k, top_p, ties="keep"):
    """verify.cuh resolve_ties: 0-based rank (by index) of the last kept token of a one-score
    bucket, and the kept mass; None when the boundary is not in the bucket."""
    n = plan["members"]
    r = top_k - 1 - plan["count_above"] if plan["kb"] == plan["p_lo"] else n - 1
    if not 0 <= r < n:
        return None
    if ties == "keep":
        r = n - 1  # every token tied with the k-th largest score
    last = r
    if top_p < 1.0:
        target = top_p * ((above + float(r + 1) * m) + mid)
        before = lambda j: above + float(j) * m  # noqa: E731
        if not before(0) < target:
            return None
        lo, hi = 0, r
        while lo < hi:
            middle = lo + (hi - lo + 1) // 2
            if before(middle) < target:
                lo = middle
            else:
                hi = middle - 1
        last = lo
        if last == r and plan["kb"] >= NUM_BUCKETS and plan["below"] > 0 and before(r + 1) < target:
            return None
    return last, above + float(last + 1) * m


def tie_index(member: np.ndarray, rank: int, vec: int, threads: int = 256) -> int:
    """truncation_resolve_kernel's tie path: the per-chunk member counts (from the collect or
    refine pass) locate the chunk of the rank-th member; one block scans that chunk in tiles of
    `threads` 16-byte vectors, thread counts prefixed in thread order, and the thread whose
    range holds the rank walks its vector."""
    chunk = CHUNK_VECTORS * vec
    counts = [int(member[begin : begin + chunk].sum()) for begin in range(0, len(member), chunk)]
    seen = 0
    for c, n in enumerate(counts):
        if rank < seen + n:
            break
        seen += n
    else:
        raise AssertionError("rank beyond the members")
    local, vectors = rank - seen, (len(member) + vec - 1) // vec
    begin, end = c * CHUNK_VECTORS, min(vectors, (c + 1) * CHUNK_VECTORS)
    carry = 0
    for tile in range(begin, end, threads):
        own = [int(member[k * vec : (k + 1) * vec].sum()) if k < end else 0 for k in range(tile, tile + threads)]
        first = carry + np.concatenate([[0], np.cumsum(own)[:-1]])
        for t, k in enumerate(range(tile, tile + threads)):
            if own[t] and first[t] <= local < first[t] + own[t]:
                hits = np.flatnonzero(member[k * vec : (k + 1) * vec])
                return int(k * vec + hits[local - first[t]])
        carry += sum(own)
    raise AssertionError("not found")


def kept_by_buckets(scores: np.ndarray, top_k: int, top_p: float, vec: int = 8, tie_low_index: bool = True,
                    reads: list | None = None, modes: list | None = None, ties: str = "keep") -> np.ndarray:
    """The kept set of one row as the bucketed kernels compute it (float64 masses with exact
    exp in place of fast_exp). `reads` gets the full passes over the logits row: histogram,
    refine (level-2 histogram; kRefine plans only), collect (kCollect / kTies plans), the one
    chunk the tie path reads (counted as a full pass), and a radix fallback's key-range, digit
    and normaliser passes. `modes` gets the mode that settled the row (REFINE: a level-2
    plan settled it by collect; TIES also covers kTiesCounted). `tie_low_index=False` is the
    negative control (ties to the higher index); `ties` is the top-k tie rule (top_k_ties)."""
    vocab = len(scores)
    max_score = float(scores.max())
    with np.errstate(invalid="ignore"):
        mass = np.exp(scores - max_score)
    mass = np.where(np.isnan(mass), 0.0, mass)
    bucket = score_bucket(scores, max_score)
    count1 = np.bincount(bucket, minlength=NUM_BUCKETS)
    fixed1 = np.zeros(NUM_BUCKETS, dtype=np.uint64)
    np.add.at(fixed1, bucket, fixed_mass(mass))  # integer atomics: any order, same sums
    plan = dict(make_plan(count1, fixed1, top_k, top_p, level1_base(vocab, top_k)), level=1, refined=-1)
    passes, settled_by = 1, plan["mode"]
    chunk = CHUNK_VECTORS * vec

    def radix() -> np.ndarray:
        digits: list = []
        kept = kept_by_radix(scores, top_k, top_p, tie_low_index=tie_low_index, passes=digits, ties=ties)
        if reads is not None:
            reads.append(passes + 1 + len(digits) + 1)
        if modes is not None:
            modes.append(RADIX)
        return kept

    def chunk_sums(key: np.ndarray, plan: dict) -> tuple[float, float]:
        above = mid = 0.0  # per chunk (block reductions), chunks in order
        for begin in range(0, vocab, chunk):
            k, m = key[begin : begin + chunk], mass[begin : begin + chunk]
            above += float(np.sum(m[k < plan["p_lo"]]))
            mid += float(np.sum(m[(k > plan["p_hi"]) & (k < plan["kb"])]))
        return above, mid

    counted = False
    if plan["mode"] == REFINE:  # level-2 histogram of the refined bucket (a pass), then plan2
        passes += 1
        refined = plan["p_lo"]
        inside = bucket == refined
        if len(np.unique(order_key(scores[inside]))) == 1 and int(inside.sum()) == plan["members"]:
            plan["mode"], settled_by, counted = TIES, TIES, True  # kTiesCounted
        else:
            sub = sub_bucket(scores[inside], max_score, refined)
            count2 = np.bincount(sub, minlength=NUM_BUCKETS)
            fixed2 = np.zeros(NUM_BUCKETS, dtype=np.uint64)
            np.add.at(fixed2, sub, fixed_mass(mass[inside]))
            plan = dict(make_plan(count2, fixed2, top_k, top_p, level2_base(count1, fixed1, plan)), level=2, refined=refined)
            settled_by = REFINE if plan["mode"] == COLLECT else plan["mode"]
    if plan["mode"] == RADIX:
        return radix()
    key = plan_key(scores, max_score, plan)
    if not counted:
        passes += 1  # collect
    above, mid = chunk_sums(key, plan)
    p_lo, p_hi, kb = plan["p_lo"], plan["p_hi"], plan["kb"]
    member = ((key >= p_lo) & (key <= p_hi)) | (key == kb)
    index = np.flatnonzero(member)
    assert len(index) == plan["members"]
    if plan["mode"] == COLLECT:
        keys = order_key(scores[index])
        order = np.lexsort((index if tie_low_index else -index, ~keys))  # key descending, then index
        cand = index[order]
        got = resolve_candidates(plan, key[cand], mass[cand], keys[order], above, mid, top_k, top_p, ties)
        if got is None:
            return radix()
        last, total = got
        threshold, last_index = scores[cand[last]], cand[last]
    else:
        if len(np.unique(order_key(scores[index]))) != 1:
            return radix()
        got = resolve_ties(plan, above, mid, float(mass[index[0]]), top_k, top_p, ties)
        if got is None:
            return radix()
        rank, total = got
        threshold = scores[index[0]]
        if tie_low_index and rank == plan["members"] - 1:
            last_index = vocab  # every token of the score is kept: no index to find
        elif tie_low_index:
            passes += 1  # the chunk holding the rank-th token (by index): at most one pass
            last_index = tie_index(scores == threshold, rank, vec)
            assert last_index == int(index[rank])
        else:
            passes += 1
            last_index = int(index[::-1][rank])
    assert total > 0.0
    if reads is not None:
        reads.append(passes)
    if modes is not None:
        modes.append(settled_by)
    if not tie_low_index:
        return (scores > threshold) | ((scores == threshold) & (np.arange(vocab) >= last_index))
    return (scores > threshold) | ((scores == threshold) & (np.arange(vocab) <= last_index))


def bucket_rows(rng, vocab: int):
    """Rows with heavy ties: float32-like, bfloat16-rounded at two temperatures, constant,
    half -inf, two-valued, and a narrow bfloat16 row (many tokens per bucket)."""
    torch = pytest.importorskip("torch")
    base = 3.0 * rng.standard_normal(vocab)
    bf16 = lambda x: torch.tensor(x).to(torch.bfloat16).double().numpy()  # noqa: E731
    masked = base.copy()
    masked[rng.random(vocab) < 0.5] = -np.inf
    masked[rng.integers(vocab)] = 2.0
    yield "normal", base
    yield "bf16", bf16(base)
    yield "bf16/0.7", bf16(base) * (1.0 / 0.7)
    yield "constant", np.full(vocab, 1.25)
    yield "masked", masked
    yield "two-valued", np.where(rng.random(vocab) < 0.3, 0.5, -0.25)
    yield "narrow bf16", bf16(0.05 * base)


@pytest.mark.parametrize("ties", ["keep", "exact-k"])
@pytest.mark.parametrize("vocab", [1, 2, 99, 989, 128256])
def test_bucketed_kept_sets_match_warp(vocab, ties):
    """The bucketed selection keeps exactly sss_ext.warp.kept_mask's tokens (float64 scores,
    ties to the lower index, top-k under the tie rule, then top-p) on rows with heavy ties and
    -inf, in at most 3 passes over the logits (2 outside the one-score tie path) except the
    radix fallback, which only the narrow bfloat16 row needs; the controls breaking ties to the
    higher index, and applying the other top-k tie rule, must differ."""
    torch = pytest.importorskip("torch")
    from sss_ext.warp import kept_mask

    other = {"keep": "exact-k", "exact-k": "keep"}[ties]
    rng = np.random.default_rng(vocab)
    control_differs, other_rule_differs, modes, fallbacks = False, False, [], set()
    for kind, scores in bucket_rows(rng, vocab):
        for top_k, top_p in itertools.product((0, 1, 2, 50, vocab), (1e-9, 0.5, 0.9, 1.0)):
            if not ((0 < top_k < vocab) or top_p < 1.0):
                continue
            expected = kept_mask(torch.tensor(scores, dtype=torch.float64), top_k, top_p, ties).numpy()
            reads: list = []
            got = kept_by_buckets(scores, top_k, top_p, reads=reads, modes=modes, ties=ties)
            assert np.array_equal(got, expected), (kind, top_k, top_p)
            if modes[-1] == RADIX:
                fallbacks.add(kind)
            else:
                assert reads[0] <= 3, (kind, top_k, top_p, reads)
            if vocab >= 99 and kind in ("constant", "two-valued", "bf16"):
                control_differs |= not np.array_equal(
                    kept_by_buckets(scores, top_k, top_p, tie_low_index=False, ties=ties), expected)
                other_rule_differs |= not np.array_equal(kept_by_buckets(scores, top_k, top_p, ties=other), expected)
    if vocab >= 99:
        assert control_differs and other_rule_differs
    # Only the narrow row (~4000 tokens of ~30 distinct scores per bucket at the boundary) needs
    # the radix fallback; the constant rows take the tie path.
    assert fallbacks <= {"narrow bf16"}, fallbacks
    if vocab == 128256:
        assert TIES in modes


@pytest.mark.parametrize("ties", ["keep", "exact-k"])
def test_bucketed_plan_bounds_hold_for_random_rows(ties):
    """Many random rows and parameters (float32 and bfloat16 scores, temperatures from flat to
    very peaked, masks): the kept sets equal kept_mask; every row settled without the radix
    fallback costs at most 3 passes, and the fallback stays rare (measured: 1 of 281 rows, a
    flat row with top_k = V / 2 and top_p = 0.999, whose planned top-p range spans several
    buckets of more than kTruncCandidates tokens together)."""
    torch = pytest.importorskip("torch")
    from sss_ext.warp import kept_mask

    rng = np.random.default_rng(7)
    modes: list = []
    for trial in range(300):
        vocab = int(rng.choice([3, 17, 257, 1000, 5000]))
        scores = rng.standard_normal(vocab) * float(rng.choice([0.05, 1.0, 4.0, 30.0]))
        if trial % 3 == 1:
            scores = torch.tensor(scores).to(torch.bfloat16).double().numpy() * (1.0 / float(rng.choice([0.3, 1.0, 1.5])))
        if trial % 5 == 2:
            scores[rng.random(vocab) < 0.7] = -np.inf
            scores[rng.integers(vocab)] = 0.0
        top_k = int(rng.choice([0, 1, 2, 7, vocab // 2, vocab - 1, vocab]))
        top_p = float(rng.choice([1e-9, 0.1, 0.5, 0.9, 0.999, 1.0]))
        if not ((0 < top_k < vocab) or top_p < 1.0):
            continue
        expected = kept_mask(torch.tensor(scores), top_k, top_p, ties).numpy()
        reads: list = []
        got = kept_by_buckets(scores, top_k, top_p, reads=reads, modes=modes, ties=ties)
        assert np.array_equal(got, expected), (trial, top_k, top_p)
        if modes[-1] == RADIX:
            assert 0 < top_k < vocab and top_p < 1.0 and top_k >= vocab // 2, (trial, top_k, top_p)
        else:
            assert reads[0] <= 3, (trial, top_k, top_p, reads)
    assert modes.count(RADIX) <= 3, modes.count(RADIX)


@pytest.mark.parametrize("ties", ["keep", "exact-k"])
@pytest.mark.parametrize("case", ["constant", "two scores", "close scores", "far tail"])
def test_bucketed_heavy_buckets(case, ties):
    """Planned buckets beyond kTruncCandidates tokens: a one-score row takes the tie path from the
    level-2 pass's counts (3 passes: histogram, refine, one chunk); two plateaus in one level-1
    bucket split at level 2 and take the tie path there (histogram, refine, collect, one chunk:
    3 passes plus one chunk, counted as 4); several scores inside one level-2 sub-bucket fall
    back to the radix descent (exact, > 3 passes); a deep top-k in the low-temperature tail is
    refined by the tail's mantissa bits (3 passes). All keep exactly kept_mask's tokens."""
    torch = pytest.importorskip("torch")
    from sss_ext.warp import kept_mask

    rng = np.random.default_rng(11)
    vocab = 3 * CANDIDATES
    if case == "constant":
        scores, want, max_reads = np.full(vocab, -2.5), TIES, 3
    elif case == "two scores":
        scores, want, max_reads = np.where(np.arange(vocab) % 2 == 0, 1.0, 1.0 - 2.0**-7), TIES, 4
    elif case == "close scores":
        scores, want, max_reads = 1.0 - rng.integers(0, 1000, vocab) * 2.0**-40, RADIX, None
    else:
        scores, want, max_reads = 30.0 * rng.standard_normal(4 * vocab), REFINE, 3
    params = ((len(scores) // 2, 1.0), (len(scores) // 3, 1.0)) if case == "far tail" else ((CANDIDATES + 5, 1.0), (0, 0.5))
    for top_k, top_p in params:
        modes: list = []
        reads: list = []
        got = kept_by_buckets(scores, top_k, top_p, reads=reads, modes=modes, ties=ties)
        assert np.array_equal(got, kept_mask(torch.tensor(scores), top_k, top_p, ties).numpy()), (case, top_k, top_p)
        assert modes == [want], (case, top_k, top_p, modes)
        if max_reads is None:
            assert reads[0] > 3
        else:
            assert reads[0] <= max_reads, (case, reads)


def test_bucket_function_is_monotone_and_tie_preserving():
    """score_bucket never puts a higher score in a later bucket, gives equal scores (also -0 and
    +0) one bucket and keeps -inf in the last; the control with the bucket order reversed
    breaks the monotonicity."""
    rng = np.random.default_rng(8)
    scores = np.sort(np.concatenate([rng.standard_normal(5000) * 20.0, [0.0, -0.0, -np.inf, 1e300, -1e300]]))[::-1]
    buckets = score_bucket(scores, float(scores[0]))
    assert np.all(np.diff(buckets) >= 0)
    assert buckets[-1] == NUM_BUCKETS - 1 and buckets[0] == 0
    assert score_bucket(np.array([0.0, -0.0]), 3.0)[0] == score_bucket(np.array([0.0, -0.0]), 3.0)[1]
    assert not np.all(np.diff(NUM_BUCKETS - 1 - buckets) >= 0)


def test_bucketed_passes_and_bytes():
    """Bytes read by the truncation per call at B = 32, K = 4, V = 128256 bfloat16 with a ref
    (p* reads target, draft, ref rows at K + 1 positions; r~ reads draft rows at K positions),
    top_k = 50 and top_p = 0.9: radix descent (previous kernel) against the bucketed one, from
    the emulated pass counts over logits-like rows."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    vocab, batch, k = 128256, 32, 4
    row_reads = batch * ((k + 1) * 3 + k)  # logits rows read per pass
    before, after = [], []
    for tau in (1.0, 0.7):
        logits = torch.tensor(2.5 * rng.standard_normal(vocab) + 8.0 * (rng.random(vocab) < 1e-3)).to(torch.bfloat16).double().numpy()
        scores = logits * (1.0 / tau)
        digits: list = []
        kept_by_radix(scores, 50, 0.9, passes=digits)
        before.append(1 + len(digits) + 1)
        reads: list = []
        kept_by_buckets(scores, 50, 0.9, reads=reads)
        after.append(reads[0])
    bytes_before = max(before) * row_reads * vocab * 2
    bytes_after = max(after) * row_reads * vocab * 2
    print(f"truncation reads per row: radix {before}, bucketed {after}; bytes per call "
          f"{bytes_before / 1e6:.0f} MB -> {bytes_after / 1e6:.0f} MB")
    assert max(after) <= 3 and bytes_after < bytes_before
