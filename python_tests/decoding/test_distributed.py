"""Data-parallel generation: ``torchrun --nproc-per-node 2 -m sss_ext generate`` on CPU, --resume, failures, the Python API."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sss_ext
from sss_ext import cli
from sss_ext.distributed import (DistributedGenerationError, DistributedSession, gather_results, generate_sharded,
                                 shard_indices, summed_stats)
from decoding_helpers import save_tiny_models, trio

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["w2 w3 w4", "w5", "w6 w7", "w8 w9 w10 w2", "w3", "w4 w4", "w11 w5", "w7", "w9 w2 w3"]
TORCHRUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def _prompts_file(path: Path, lines) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _argv(model_dirs, prompts: Path, out: Path, batch_size: int, *extra) -> list[str]:
    return ["generate", "--target", model_dirs["target"], "--draft", model_dirs["draft"], "--ref", model_dirs["ref"],
            "--method", "sss", "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "6",
            "--num-draft-tokens", "3", "--temperature", "0.9", "--seed", "7", "--batch-size", str(batch_size),
            "--no-progress", *extra]


def _torchrun(argv: list[str], nproc: int = 2, pythonpath: tuple = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), *map(str, pythonpath)]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "sss_ext", *argv]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _comparable(record: dict) -> dict:
    """The record without timings, and log_z to 1e-5 (other thread counts round float32 logits differently)."""
    stats = {k: v for k, v in record["stats"].items() if k not in ("wall_time", "tokens_per_second")}
    return dict(record, stats=stats, log_z=pytest.approx(record["log_z"], rel=1e-5, abs=1e-5))


@pytest.fixture(scope="module")
def single_process(model_dirs, tmp_path_factory):
    """The job in one process with batch sizes 1 and 4: (prompts file, records of batch 1, records of batch 4)."""
    root = tmp_path_factory.mktemp("single")
    prompts = _prompts_file(root / "prompts.jsonl", [{"prompt": p, "id": f"p{i}"} for i, p in enumerate(PROMPTS)])
    runs = []
    for batch_size in (1, 4):
        out = root / f"out_{batch_size}.jsonl"
        assert cli.main(_argv(model_dirs, prompts, out, batch_size)) == 0
        runs.append(_read(out))
    return prompts, runs[0], runs[1]


def test_batch_size_does_not_change_texts(single_process):
    _, batch1, batch4 = single_process
    assert [r["token_ids"] for r in batch1] == [r["token_ids"] for r in batch4]


def test_two_ranks_one_file_in_input_order(model_dirs, single_process, tmp_path):
    prompts, batch1, _ = single_process
    out = tmp_path / "out.jsonl"
    result = _torchrun(_argv(model_dirs, prompts, out, 1))
    assert result.returncode == 0, result.stderr[-3000:]
    records = _read(out)
    assert [r["index"] for r in records] == list(range(len(PROMPTS)))  # none lost, none twice, in order
    assert [r["id"] for r in records] == [f"p{i}" for i in range(len(PROMPTS))]
    # same texts, same per-prompt counters as one process (batch 1 both ways: the same forwards)
    assert [_comparable(r) for r in records] == [_comparable(r) for r in batch1]
    summed = summed_stats(records)
    assert summed["new_tokens"] == sum(len(r["token_ids"]) for r in batch1)
    assert {k: v for k, v in summed.items() if k != "wall_time"} == \
        {k: v for k, v in summed_stats(batch1).items() if k != "wall_time"}
    assert not (tmp_path / "out.jsonl.partial").exists() and not (tmp_path / "out.jsonl.tmp").exists()


@pytest.mark.slow
def test_resume_two_ranks_completes_the_file(model_dirs, single_process, tmp_path):
    prompts, batch1, _ = single_process
    out = tmp_path / "out.jsonl"
    # an earlier job stopped after 4 prompts, the last record cut off mid-line
    kept = [batch1[i] for i in (0, 3, 4, 8)]
    partial = tmp_path / "out.jsonl.partial"
    partial.write_text("".join(json.dumps(r) + "\n" for r in kept) + json.dumps(batch1[5])[:40])
    result = _torchrun(_argv(model_dirs, prompts, out, 2, "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = _read(out)
    assert [r["index"] for r in records] == list(range(len(PROMPTS)))
    for index in (0, 3, 4, 8):
        assert records[index] == batch1[index]  # kept verbatim, not generated again
    assert [r["token_ids"] for r in records] == [r["token_ids"] for r in batch1]
    assert not partial.exists()


def test_resume_refuses_other_settings(model_dirs, single_process, tmp_path):
    prompts, batch1, _ = single_process
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps(batch1[0]) + "\n")
    argv = _argv(model_dirs, prompts, out, 2, "--resume")
    argv[argv.index("--seed") + 1] = "8"
    assert cli.main(argv) == 2
    assert out.read_text() == json.dumps(batch1[0]) + "\n"  # untouched


@pytest.mark.slow
def test_failing_rank_ends_the_job_naming_rank_and_prompt(model_dirs, tmp_path):
    # the reward of best-of-N raises on prompt 5 ("w4 w4"), which runs on rank 1, after every check passed
    (tmp_path / "planted_failure.py").write_text(
        "def reward(texts):\n"
        "    if any(text.startswith('w4 w4') for text in texts):\n"
        "        raise RuntimeError('planted failure')\n"
        "    return [float(len(text)) for text in texts]\n")
    prompts = _prompts_file(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    out = tmp_path / "out.jsonl"
    argv = _argv(model_dirs, prompts, out, 1, "--reward-fn", "planted_failure:reward", "--num-samples", "2")
    argv[argv.index("--method") + 1] = "bon"
    result = _torchrun(argv, pythonpath=(tmp_path,))  # raises subprocess.TimeoutExpired on a hang
    assert result.returncode != 0
    assert result.stderr.count("rank 1 failed on prompt indices [5]") >= 2, result.stderr[-3000:]  # both ranks say so
    assert not out.exists()
    done = [json.loads(line)["index"] for line in (tmp_path / "out.jsonl.partial").read_text().splitlines()]
    assert sorted(done) == [0, 1, 2, 3, 4]  # the steps before the failure are kept for --resume


# --- the Python API, in one process ------------------------------------------------------------------------

def test_shard_indices_partition():
    for count in (0, 1, 2, 7, 10):
        for world_size in (1, 2, 3, 16):
            shards = [shard_indices(count, rank, world_size) for rank in range(world_size)]
            assert sorted(i for shard in shards for i in shard) == list(range(count))
    assert shard_indices([5, 9, 11, 20], 1, 2) == [9, 20]
    for bad in ((3, 2, 2), (3, -1, 2), (3, 0, 0), (-1, 0, 1), (3, True, 2)):
        with pytest.raises(ValueError):
            shard_indices(*bad)


class _Peers:
    """A session whose all_gather answers with given statuses of other ranks (rank 0 of 3)."""

    rank, world_size, is_main = 0, 3, True

    def __init__(self, others):
        self.others = others

    def all_gather(self, value):
        return [value, *self.others]


def test_gather_results_orders_and_raises_everywhere():
    mine = [{"index": 4}, {"index": 0}]
    merged = gather_results(_Peers([([{"index": 3}], None), ([], None)]), mine)
    assert [r["index"] for r in merged] == [0, 3, 4]
    with pytest.raises(DistributedGenerationError, match="rank 2 failed on prompt indices \\[7\\]"):
        gather_results(_Peers([([], None), ([], "rank 2 failed on prompt indices [7]: ValueError: x")]), mine)


def test_generate_sharded_single_process_matches_generate():
    target, draft, ref = trio(10)
    prompts = [[1, 2], [3], [4, 5, 6], [7]]
    session = DistributedSession.from_env()
    assert (session.rank, session.world_size) == (0, 1)
    records = generate_sharded(session, target, draft, prompts, prompt_indices=[10, 11, 12, 13], batch_size=3,
                               ref_model=ref, method="sss", max_new_tokens=5, seed=2)
    direct = sss_ext.generate(target, draft, prompts, ref_model=ref, method="sss", max_new_tokens=5, seed=2,
                              prompt_indices=[10, 11, 12, 13])
    assert [r["index"] for r in records] == [10, 11, 12, 13]
    assert [r["token_ids"] for r in records] == [s.tolist() for s in direct.sequences]
    assert [r["log_z"] for r in records] == pytest.approx(direct.log_z)
    with pytest.raises(ValueError, match="batch_size"):
        generate_sharded(session, target, draft, prompts, batch_size=0)
    with pytest.raises(ValueError, match="distinct"):
        generate_sharded(session, target, draft, prompts, prompt_indices=[1, 1, 2, 3])
    with pytest.raises(ValueError, match="timeout_s"):
        DistributedSession.from_env(timeout_s=0)
