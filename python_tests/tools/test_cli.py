"""``python -m sss_ext generate``: the embedded default models or local model directories, JSONL in and out,
every argument error named by its flag before anything loads."""

import json
import subprocess
import sys

import pytest
import torch

from sss_ext import cli
from decoding_helpers import save_tiny_models, trio, word_tokenizer


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


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
    flat = " ".join(result.stdout.split())
    assert "With no model path the embedded default models run" in flat
    assert "a path overrides that role" in flat


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


def _no_loading(monkeypatch):
    """Make any model or tokenizer load, and the progress bar, fail the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("an argument error must be reported before anything loads")

    monkeypatch.setattr(cli, "load_models", refuse)
    monkeypatch.setattr(cli, "load_tokenizer", refuse)
    import tqdm

    monkeypatch.setattr(tqdm, "tqdm", refuse)


def _bad_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("argv,message", [
    (["--target", "/nonexistent/dir"], "--target '/nonexistent/dir' is not a local directory"),
    (["--ref", "/nonexistent/dir"], "--ref '/nonexistent/dir' is not a local directory"),
    (["--num-draft-tokens", "0"], "--num-draft-tokens must be an int >= 1, got 0"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be an int >= 1, got -3"),
    (["--temperature", "-1"], "--temperature must be"),
    (["--temperature", "nan"], "--temperature must be"),
    (["--top-k", "-1"], "--top-k must be an int >= 0"),
    (["--top-p", "0"], "--top-p must be a float in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be a float in (0, 1]"),
    (["--shift", "-0.5"], "--shift (lambda) must be a finite float >= 0"),
    (["--shift", "inf"], "--shift (lambda) must be a finite float >= 0"),
    (["--num-samples", "0"], "--num-samples must be an int >= 1"),
    (["--num-candidates", "0"], "--num-candidates must be an int >= 1"),
    (["--draft-cost-ratio", "-1"], "--draft-cost-ratio must be a finite float"),
    (["--dist-timeout", "0"], "--dist-timeout must be a finite number of seconds > 0"),
    (["--rejection-interval", "0"], "--rejection-interval must be an int >= 1"),
    (["--rejection-rate", "1"], "--rejection-rate must be a finite float in [0.0, 1.0)"),
    (["--beta", "-1"], "--beta must be a finite float"),
    (["--pad-token-id", "-1"], "--pad-token-id must be an int >= 0"),
    (["--eos-token-id", "-2"], "--eos-token-id must be an int >= 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
    (["--method", "bon"], "--method bon needs --reward DIR or --reward-fn MODULE:FUNCTION"),
    (["--proposer", "ngram", "--method", "vanilla"], "--proposer ngram: method='vanilla' does not take proposer='ngram'"),
    (["--proposer", "ngram", "--ngram-sizes", "1", "2"], "--ngram-sizes must be two ints (largest, smallest)"),
    (["--proposer", "ngram", "--draft-length-policy", "adaptive"], "proposer='ngram' needs draft_length_policy='fixed'"),
    (["--draft-tree", "2", "0"], "--draft-tree must be a non-empty tuple of ints >= 1"),
    (["--draft-tree", "2", "--method", "vanilla"], "--draft-tree 2: method='vanilla' does not take draft_tree=(2,)"),
    (["--draft-tree", "2", "--proposer", "ngram"], "--draft-tree needs proposer='draft'"),
    (["--verification", "block", "--method", "vanilla"], "--verification block: method='vanilla' does not take verification='block'"),
    (["--verification", "block", "--draft-tree", "2"], "--verification='block' verifies a chain of drafts"),
    (["--method", "soft-bon"], "--method soft-bon needs --reward"),
    (["--reward-fn", "no_colon"], "--reward-fn must look like MODULE:FUNCTION"),
    (["--reward-fn", "no_such_module_xyz:score"], "--reward-fn 'no_such_module_xyz:score': cannot import"),
    (["--reward-fn", "json:no_such_function"], "module 'json' has no 'no_such_function'"),
    (["--reward-fn", "json:__name__"], "is not callable"),
])
def test_argument_errors_name_the_flag_before_anything_loads(prompts_file, tmp_path, capsys, monkeypatch, argv, message):
    _no_loading(monkeypatch)
    code = cli.main(["generate", "--prompts", str(prompts_file), "--out", str(tmp_path / "o.jsonl"), *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    ("", "holds no prompts"),
    ("{not json\n", "--prompts line 1 is not JSON"),
    ('{"prompt": "w2"}\n{"text": "w3"}\n', '--prompts line 2 needs "prompt" or "input_ids"'),
    ('{"prompt": ""}\n', '--prompts line 1: "prompt" must be a non-empty string'),
    ('{"prompt": 5}\n', '--prompts line 1: "prompt" must be a non-empty string'),
    ('{"input_ids": []}\n', '--prompts line 1: "input_ids" must be a non-empty list of ints >= 0'),
    ('{"input_ids": [1, -4]}\n', '"input_ids" must be a non-empty list of ints >= 0'),
    ('{"input_ids": [1.5]}\n', '"input_ids" must be a non-empty list of ints >= 0'),
    ("[1, 2]\n", '--prompts line 1 needs "prompt" or "input_ids"'),
])
def test_prompts_file_errors(tmp_path, capsys, monkeypatch, content, message):
    _no_loading(monkeypatch)
    path = tmp_path / "p.jsonl" if content is None else _bad_file(tmp_path, "p.jsonl", content)
    code = cli.main(["generate", "--prompts", str(path), "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


def test_out_errors(prompts_file, tmp_path, capsys, monkeypatch):
    _no_loading(monkeypatch)
    assert cli.main(["generate", "--prompts", str(prompts_file), "--out", str(tmp_path)]) == 2
    assert f"--out {str(tmp_path)!r} is a directory" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["generate", "--prompts", str(prompts_file), "--out", str(blocker / "sub" / "o.jsonl")]) == 2
    assert "cannot be written" in capsys.readouterr().err


def test_cuda_device_without_cuda(prompts_file, tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    _no_loading(monkeypatch)
    assert cli.main(["generate", "--prompts", str(prompts_file), "--out", str(tmp_path / "o.jsonl"), "--device", "cuda"]) == 2
    assert "--device 'cuda': CUDA is not available" in capsys.readouterr().err


def test_argparse_errors_exit_2_naming_the_flag():
    for argv, flag in ((["generate", "--out", "o.jsonl"], "--prompts"), (["generate", "--prompts", "p", "--out", "o",
                                                                          "--num-draft-tokens", "two"], "--num-draft-tokens"),
                       (["generate", "--prompts", "p", "--out", "o", "--method", "nope"], "--method")):
        result = subprocess.run([sys.executable, "-m", "sss_ext", *argv], capture_output=True, text=True)
        assert result.returncode == 2 and flag in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_value_error_from_the_command_line_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sss_ext", "generate", "--prompts", str(tmp_path / "missing.jsonl"),
                             "--out", str(tmp_path / "o.jsonl")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --prompts") and "Traceback" not in result.stderr, result.stderr


def test_bare_command_prints_help():
    result = subprocess.run([sys.executable, "-m", "sss_ext"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "usage: python -m sss_ext" in result.stdout and "generate" in result.stdout


# ---------------------------------------------------------------- the embedded default models

@pytest.fixture
def fake_defaults(monkeypatch):
    """sss_ext.models.load_default and the default tokenizer replaced by tiny models (vocabulary 12)."""
    from sss_ext import models as default_models
    from sss_ext.models import target as default_target

    calls = []
    tokenizer = word_tokenizer(12)

    def load_default(*, rewards=True, gold=True, aligned=True, threads=None):
        calls.append({"rewards": rewards, "aligned": aligned})
        target, draft, ref = trio(12)
        return default_models.DefaultModels(target=target, draft=draft if aligned else None, ref_draft=ref,
                                            tokenizer=tokenizer)

    monkeypatch.setattr(default_models, "load_default", load_default)
    monkeypatch.setattr(default_target, "load_tokenizer", lambda: tokenizer)
    return calls


def test_no_model_paths_use_the_default_models(fake_defaults, prompts_file, tmp_path):
    out = tmp_path / "r.jsonl"
    code = cli.main(["generate", "--prompts", str(prompts_file), "--out", str(out), "--max-new-tokens", "4",
                     "--no-progress"])
    assert code == 0
    assert fake_defaults == [{"rewards": False, "aligned": True}]
    records = _read(out)
    assert len(records) == 3 and all(r["method"] == "sss" and "log_z" in r for r in records)
    assert records[0]["prompt_ids"] == [2, 3, 4]


def test_sd_with_the_ngram_proposer_loads_no_draft(fake_defaults, model_dirs, prompts_file, tmp_path):
    """--proposer ngram: sd runs the target alone (no draft loads), sss still loads r and d."""
    out = tmp_path / "ngram.jsonl"
    assert cli.main(["generate", "--target", model_dirs["target"], "--method", "sd", "--proposer", "ngram",
                     "--ngram-sizes", "2", "1", "--prompts", str(prompts_file), "--out", str(out), "--max-new-tokens", "6",
                     "--no-progress"]) == 0
    assert fake_defaults == []
    records = _read(out)
    assert len(records) == 3 and records[0]["config"]["proposer"] == "ngram" and records[0]["config"]["ngram_sizes"] == [2, 1]
    assert all(r["stats"]["draft_calls"] == 0 for r in records)
    assert cli.main(["generate", "--target", model_dirs["target"], "--method", "sss", "--proposer", "ngram",
                     "--prompts", str(prompts_file), "--out", str(out), "--max-new-tokens", "6", "--no-progress"]) == 0
    assert fake_defaults == [{"rewards": False, "aligned": True}]


def test_generate_with_a_draft_tree(fake_defaults, model_dirs, prompts_file, tmp_path):
    out = tmp_path / "tree.jsonl"
    assert cli.main(["generate", "--target", model_dirs["target"], "--draft", model_dirs["draft"], "--ref", model_dirs["ref"],
                     "--method", "sss", "--draft-tree", "2", "2", "--tree-replacement", "--prompts", str(prompts_file),
                     "--out", str(out), "--max-new-tokens", "6", "--no-progress"]) == 0
    records = _read(out)
    assert len(records) == 3 and records[0]["config"]["draft_tree"] == [2, 2] and records[0]["config"]["tree_replacement"]
    assert all(1 <= len(r["token_ids"]) <= 6 for r in records) and records[0]["stats"]["target_calls"] > 0


def test_paths_override_their_role(fake_defaults, model_dirs, prompts_file, tmp_path):
    # every role the method runs has a path: the defaults never load
    out = tmp_path / "v.jsonl"
    assert cli.main(["generate", "--target", model_dirs["target"], "--method", "vanilla", "--prompts", str(prompts_file),
                     "--out", str(out), "--max-new-tokens", "3", "--no-progress"]) == 0
    assert fake_defaults == []
    # target and aligned draft from their directories: only the reference draft comes from the defaults
    assert cli.main(["generate", "--target", model_dirs["target"], "--draft", model_dirs["draft"], "--method", "sss",
                     "--prompts", str(prompts_file), "--out", str(out), "--max-new-tokens", "3", "--no-progress"]) == 0
    assert fake_defaults == [{"rewards": False, "aligned": False}]
    fake_defaults.clear()
    # the same seed gives the same tokens whether the target comes from a directory or the defaults
    by_path = tmp_path / "by_path.jsonl"
    by_default = tmp_path / "by_default.jsonl"
    for argv, out in ((["--target", model_dirs["target"]], by_path), ([], by_default)):
        assert cli.main(["generate", *argv, "--method", "vanilla", "--prompts", str(prompts_file), "--out", str(out),
                         "--max-new-tokens", "4", "--seed", "3", "--no-progress"]) == 0
    assert [r["token_ids"] for r in _read(by_path)] == [r["token_ids"] for r in _read(by_default)]


def test_models_that_do_not_fit_fail_before_the_progress_bar(fake_defaults, tmp_path, capsys, monkeypatch):
    import tqdm

    def no_bar(*args, **kwargs):
        raise AssertionError("the progress bar started before the models were checked")

    other = tmp_path / "big_vocab"
    model = trio(16)[0]
    model.save_pretrained(other)
    prompts = tmp_path / "ids.jsonl"
    prompts.write_text('{"input_ids": [2, 3]}\n')
    monkeypatch.setattr(tqdm, "tqdm", no_bar)
    code = cli.main(["generate", "--target", str(other), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2
    assert "do not fit together" in err and "draft has vocab_size 12 but target has 16" in err, err
    assert not (tmp_path / "o.jsonl").exists()


def test_text_prompts_without_a_tokenizer(model_dirs, tmp_path, capsys):
    bare = tmp_path / "bare_target"
    trio(12)[0].save_pretrained(bare)  # no tokenizer files
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "w2 w3"}\n')
    code = cli.main(["generate", "--target", str(bare), "--method", "vanilla", "--prompts", str(prompts),
                     "--out", str(tmp_path / "o.jsonl")])
    assert code == 2
    assert "no tokenizer was found; give --tokenizer DIR" in capsys.readouterr().err


def test_reward_fn_proxy_of_the_default_models(fake_defaults, monkeypatch, prompts_file, tmp_path):
    from sss_ext.models import rewards

    scored = []
    monkeypatch.setattr(rewards, "proxy_reward", lambda texts: scored.extend(texts) or [float(len(t)) for t in texts])
    out = tmp_path / "bon.jsonl"
    assert cli.main(["generate", "--method", "bon", "--reward-fn", "sss_ext.models.rewards:proxy_reward",
                     "--num-samples", "2", "--prompts", str(prompts_file), "--out", str(out), "--max-new-tokens", "3",
                     "--no-progress"]) == 0
    assert len(scored) == 6 and all(r["stats"]["reward_sequences"] == 2 for r in _read(out))


@pytest.mark.models
def test_default_models_end_to_end(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "I bought this lamp and", "id": "x"}\n')
    out = tmp_path / "r.jsonl"
    code = cli.main(["generate", "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "3",
                     "--num-draft-tokens", "2", "--temperature", "0.7", "--no-progress"])
    assert code == 0
    (record,) = _read(out)
    assert record["id"] == "x" and 1 <= len(record["token_ids"]) <= 3 and isinstance(record["text"], str)
    assert record["stats"]["target_calls"] >= 1 and record["config"]["num_draft_tokens"] == 2


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
