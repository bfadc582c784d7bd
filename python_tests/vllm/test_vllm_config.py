"""Bad configurations of sss_ext.vllm: each a ValueError naming the argument, at engine start.

The checks run in the processor's constructor (engine start); they are tested here directly
(no engine), and once through ``vllm.LLM`` in a subprocess (a failed in-process start would
leave vLLM's global state half built for the other test modules).
"""

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm.v1.sample.logits_processor", reason="vLLM is not installed here (scripts/vllm_check.sh builds .venv-vllm)")

import torch  # noqa: E402

import vllm_helpers as H  # noqa: E402
from sss_ext.vllm.export import export_model  # noqa: E402
from sss_ext.vllm.processor import load_drafts, parse_config, request_shift  # noqa: E402


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    return H.make_tiny_models(tmp_path_factory.mktemp("tiny"))


def _config(sss):
    return SimpleNamespace(additional_config={"sss": sss} if sss is not None else {})


def test_no_config_is_inactive():
    assert parse_config(_config(None)) is None


@pytest.mark.parametrize("sss, fragment", [
    ({"ref_draft": "."}, r"\['sss'\]\['draft'\].*required"),
    ({"draft": ".", "ref_draft": "/nonexistent/d"}, r"\['sss'\]\['ref_draft'\] = '/nonexistent/d' is not a folder"),
    ({"draft": ".", "ref_draft": ".", "lambda": 1}, r"unknown additional_config\['sss'\] key\(s\) \['lambda'\]"),
    ({"draft": ".", "ref_draft": ".", "dtype": "int8"}, r"\['sss'\]\['dtype'\] must be one of"),
    ("drafts", r"additional_config\['sss'\] must be a dict"),
])
def test_bad_config_names_the_key(sss, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_config(_config(sss))


def test_draft_with_other_vocabulary_size(tiny_paths, tmp_path):
    other = export_model(H.tiny_llama(5, vocab=24), None, tmp_path / "wide")
    cfg = {"draft": str(other), "ref_draft": str(tiny_paths["ref_draft"]), "dtype": "float32"}
    with pytest.raises(ValueError, match=r"\['sss'\]\['draft'\].*24 output logits, the target has 16"):
        load_drafts(cfg, H.TINY_VOCAB, None)


def test_draft_that_is_not_a_model(tiny_paths, tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = {"draft": str(tiny_paths["draft"]), "ref_draft": str(tmp_path / "empty"), "dtype": "float32"}
    with pytest.raises(ValueError, match=r"\['sss'\]\['ref_draft'\].*does not load as a transformers causal LM"):
        load_drafts(cfg, H.TINY_VOCAB, None)


def _word_tokenizer(words, path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0]).save_pretrained(path)
    return path


def test_draft_with_other_tokenizer(tiny_paths, tmp_path):
    words = [f"w{i}" for i in range(H.TINY_VOCAB)]
    target = _word_tokenizer(words, tmp_path / "target_tok")
    same = export_model(H.tiny_llama(2), None, tmp_path / "same")
    _word_tokenizer(words, same)
    other = export_model(H.tiny_llama(3), None, tmp_path / "other")
    _word_tokenizer(words[::-1], other)  # same size, other ids
    ok = {"draft": str(same), "ref_draft": str(same), "dtype": "float32"}
    assert len(load_drafts(ok, H.TINY_VOCAB, str(target))) == 2
    bad = {"draft": str(same), "ref_draft": str(other), "dtype": "float32"}
    with pytest.raises(ValueError, match=r"\['sss'\]\['ref_draft'\].*tokenizer whose vocabulary differs"):
        load_drafts(bad, H.TINY_VOCAB, str(target))


@pytest.mark.parametrize("extra, fragment", [
    ({"sss_shift": -0.5}, "out of range"),
    ({"sss_shift": float("inf")}, "out of range"),
    ({"sss_shift": True}, "must be a number"),
    ({"sss_lambda": 1}, "unknown SamplingParams.extra_args"),
])
def test_request_checks(extra, fragment):
    from vllm import SamplingParams

    with pytest.raises(ValueError, match=fragment):
        request_shift(SamplingParams(extra_args=extra))
    assert request_shift(SamplingParams()) == 0.0
    assert request_shift(SamplingParams(extra_args={"other_plugin": 1})) == 0.0


def test_engine_start_with_missing_draft_fails_naming_it(tiny_paths, tmp_path):
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(H.__file__)!r})
        import vllm_helpers as H
        paths = {{"draft": {str(tmp_path / "missing")!r}, "ref_draft": {str(tiny_paths["ref_draft"])!r}}}
        if __name__ == "__main__":
            H.start_engine({str(tiny_paths["target"])!r}, sss=paths, skip_tokenizer_init=True, max_model_len=64,
                           num_gpu_blocks_override=8)
    """)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0
    assert "additional_config['sss']['draft']" in proc.stderr and "is not a folder" in proc.stderr, proc.stderr[-3000:]


def _processor(tiny_paths):
    """An active processor on the tiny drafts, built without an engine (vLLM's constructor
    needs a full VllmConfig; the state it sets is the same)."""
    from sss_ext.vllm.drafts import DraftBatch
    from sss_ext.vllm.processor import SSSLogitsProcessor

    cfg = {"draft": str(tiny_paths["draft"]), "ref_draft": str(tiny_paths["ref_draft"]), "dtype": "float32"}
    processor = SSSLogitsProcessor.__new__(SSSLogitsProcessor)
    processor.cfg, processor.duplicate, processor.rows = cfg, False, {}
    processor.device = torch.device("cpu")
    processor.batch = DraftBatch(*load_drafts(cfg, H.TINY_VOCAB, None), processor.device)
    return processor


def _added(*requests):
    from vllm import SamplingParams

    added = [(index, SamplingParams(extra_args=extra), prompt, []) for index, extra, prompt in requests]
    return SimpleNamespace(removed=[], added=added, moved=[])


def test_untilted_rows_are_never_touched(tiny_paths):
    """λ = 0 and no ``sss_shift`` leave vLLM's logits bit for bit; only tilted rows change,
    by λ·(zr − zd). A batch without tilted rows is returned as the same tensor, unread."""
    processor = _processor(tiny_paths)
    logits = torch.randn(4, H.TINY_VOCAB, generator=torch.Generator().manual_seed(0))
    processor.update_state(_added((0, None, [1, 5, 7]), (1, {"sss_shift": 0.0}, [3, 3, 9])))
    untilted = logits.clone()
    assert processor.apply(untilted) is untilted and torch.equal(untilted, logits)

    processor.update_state(_added((2, {"sss_shift": 2.0}, [1, 5, 7]), (3, {"other_plugin": 1}, [4])))
    mixed = processor.apply(logits.clone())
    for row in (0, 1, 3):
        assert torch.equal(mixed[row], logits[row]), row  # bit for bit, not just close
    draft, ref = (H.load_hf(tiny_paths[role]) for role in ("draft", "ref_draft"))
    with torch.no_grad():
        ids = torch.tensor([[1, 5, 7]])
        tilt = draft(ids).logits[0, -1] - ref(ids).logits[0, -1]
    torch.testing.assert_close(mixed[2], logits[2] + 2.0 * tilt, atol=1e-5, rtol=1e-5)
