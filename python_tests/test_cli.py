"""``python -m sss_ext generate`` (acceptance point 7): local model directories, JSONL in and out."""

import json
import subprocess
import sys

import pytest
import torch

from sss_ext import cli
from decoding_helpers import trio, word_tokenizer


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tokenizer = word_tokenizer(12)
    paths = {}
    for name, model in zip(("target", "draft", "ref"), trio(12)):
        model.config.eos_token_id = 1
        path = root / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = str(path)
    return paths


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "w2 w3 w4", "id": "a"}, {"prompt": "w5"}, {"input_ids": [6, 7, 8, 9]}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_help_documents_every_option():
    result = subprocess.run([sys.executable, "-m", "sss_ext", "generate", "--help"], capture_output=True, text=True, check=True)
    parser = cli.build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    for action in generate._actions:
        for option in action.option_strings:
            assert option in result.stdout
        assert action.help, f"{action.option_strings} has no help"
    top = subprocess.run([sys.executable, "-m", "sss_ext", "--help"], capture_output=True, text=True, check=True)
    assert "generate" in top.stdout


def test_generate_sss_writes_one_record_per_prompt(model_dirs, prompts_file, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    calls = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    out = tmp_path / "results" / "out.jsonl"
    code = cli.main(["generate", "--target", model_dirs["target"], "--draft", model_dirs["draft"], "--ref", model_dirs["ref"],
                     "--method", "sss", "--prompts", str(prompts_file), "--out", str(out), "--max-new-tokens", "6",
                     "--num-draft-tokens", "3", "--temperature", "0.9", "--seed", "5", "--batch-size", "2"])
    assert code == 0
    assert calls == [True, True, True]
    records = _read(out)
    assert [r["index"] for r in records] == [0, 1, 2]
    assert records[0]["id"] == "a" and records[0]["prompt"] == "w2 w3 w4"
    assert records[0]["prompt_ids"] == [2, 3, 4] and records[2]["prompt_ids"] == [6, 7, 8, 9]
    assert [r["seed"] for r in records] == [5, 5, 5]
    for record in records:
        assert record["method"] == "sss"
        assert record["config"]["num_draft_tokens"] == 3 and record["config"]["max_new_tokens"] == 6
        assert 1 <= len(record["token_ids"]) <= 6
        assert isinstance(record["text"], str)
        assert record["stats"]["target_calls"] >= 1 and "acceptance_rate" in record["stats"]
        assert "log_z" in record
    assert "sss" in capsys.readouterr().err  # the tqdm bar
    # same seed, same output
    again = tmp_path / "again.jsonl"
    cli.main(["generate", "--target", model_dirs["target"], "--draft", model_dirs["draft"], "--ref", model_dirs["ref"],
              "--prompts", str(prompts_file), "--out", str(again), "--max-new-tokens", "6", "--num-draft-tokens", "3",
              "--temperature", "0.9", "--seed", "5", "--batch-size", "2", "--no-progress"])
    assert [r["token_ids"] for r in _read(again)] == [r["token_ids"] for r in records]


def test_generate_bon_with_a_reward_function(model_dirs, prompts_file, tmp_path, monkeypatch):
    module = tmp_path / "my_reward.py"
    module.write_text("def score(texts):\n    return [t.count('w3') for t in texts]\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bon.jsonl"
    code = cli.main(["generate", "--target", model_dirs["target"], "--method", "bon", "--reward-fn", "my_reward:score",
                     "--num-samples", "3", "--prompts", str(prompts_file), "--out", str(out), "--max-new-tokens", "4",
                     "--no-progress"])
    assert code == 0
    records = _read(out)
    assert len(records) == 3 and all(r["stats"]["reward_sequences"] == 3 for r in records)


@pytest.mark.parametrize("argv,message", [
    (["--target", "/nonexistent/dir"], "--target '/nonexistent/dir' is not a local directory"),
    (["--method", "sss"], "needs target"),
    (["--num-draft-tokens", "0"], "num_draft_tokens must be an int >= 1"),
])
def test_errors_are_reported(model_dirs, prompts_file, tmp_path, capsys, argv, message):
    code = cli.main(["generate", "--prompts", str(prompts_file), "--out", str(tmp_path / "o.jsonl"), *argv])
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_subprocess_end_to_end(model_dirs, prompts_file, tmp_path):
    out = tmp_path / "sd.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "sss_ext", "generate", "--target", model_dirs["target"], "--draft", model_dirs["draft"],
         "--method", "sd", "--prompts", str(prompts_file), "--out", str(out), "--max-new-tokens", "5", "--temperature", "0"],
        capture_output=True, text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    records = _read(out)
    assert len(records) == 3 and all(r["method"] == "sd" for r in records)
