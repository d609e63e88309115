"""A checkpoint without tokenizer.json loads: token ids in, token ids out; text (or stop strings) is refused with
one clear error. Compared with the same checkpoint loaded with its tokenizer."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from adapterhub.cli import main
from adapterhub.errors import ConfigError
from adapterhub.runtime import load_base
from adapterhub.runtime.model.tiny import random_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    with_tokenizer = random_checkpoint(root / "with")
    bare = root / "bare"
    shutil.copytree(with_tokenizer, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink(missing_ok=True)
    return with_tokenizer, bare


def test_token_ids_generate_as_with_a_tokenizer(checkpoints):
    with_tokenizer, bare = checkpoints
    base = load_base(bare, quantize=None, compute_dtype=torch.float32)
    assert base.tokenizer is None
    prompt = [256, 72, 101, 108, 108, 111]  # <s>Hello in the byte tokenizer
    got = base.generate([prompt], max_new_tokens=6)[0]
    want = load_base(with_tokenizer, quantize=None, compute_dtype=torch.float32).generate([prompt], max_new_tokens=6)[0]
    assert got.token_ids == want.token_ids and len(got.token_ids) > 0 and got.text is None
    assert want.text is not None


def test_text_or_stop_strings_without_a_tokenizer_is_one_clear_error(checkpoints):
    _, bare = checkpoints
    base = load_base(bare, quantize=None, compute_dtype=torch.float32)
    for kwargs in ({"prompts": "Hello"}, {"prompts": [[256, 72]], "stop": ["\n"]}):
        with pytest.raises(ConfigError, match="no tokenizer") as caught:
            base.generate(**kwargs, max_new_tokens=2)
        assert str(bare) in str(caught.value) and "token ids" in str(caught.value)


def test_a_base_without_tokenizer_saves_without_one(checkpoints, tmp_path):
    _, bare = checkpoints
    load_base(bare, quantize="nf4").save_quantized(tmp_path / "nf4")
    assert not (tmp_path / "nf4" / "tokenizer.json").exists()
    assert load_base(tmp_path / "nf4").tokenizer is None


def test_cli_generate_takes_token_ids_and_refuses_text_in_one_line(checkpoints):
    _, bare = checkpoints
    runner = CliRunner()
    ok = runner.invoke(main, ["generate", "--base", str(bare), "--quantize", "none", "-n", "3", "--token-ids",
                              "256,72,101", "--json"])
    assert ok.exit_code == 0, ok.output
    out = json.loads(ok.stdout)
    assert out["text"] is None and len(out["token_ids"]) == 3 and out["prompt_tokens"] == 3
    plain = runner.invoke(main, ["generate", "--base", str(bare), "--quantize", "none", "-n", "3", "--token-ids",
                                 "256,72,101"])
    assert plain.stdout == ",".join(map(str, out["token_ids"])) + "\n"
    failed = runner.invoke(main, ["generate", "--base", str(bare), "--quantize", "none", "Hello"])
    assert failed.exit_code == 1 and failed.output.count("\n") == 1 and "no tokenizer" in failed.output
