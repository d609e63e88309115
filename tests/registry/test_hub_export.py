"""`copy REF --to hf://org/name`: huggingface_hub's own upload calls (create_repo, upload_folder) against a
local stub of the Hub's endpoints (hub_stub.py); the files of the commit are read back from the stub."""

from __future__ import annotations

import json

import pytest

from adapterhub import Registry
from adapterhub.adapter import Adapter, read_safetensors
from tests.registry.helpers import assert_one_line_error, cli, make_adapter
from tests.registry.hub_stub import hub_stub


@pytest.fixture
def hub(monkeypatch):
    with hub_stub() as stub:
        monkeypatch.setenv("HF_ENDPOINT", stub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield stub


def test_copy_to_the_hub_commits_the_peft_files_and_a_model_card_with_lineage(hub, home, tmp_path):
    registry = Registry()
    adapter = make_adapter(seed=9, use_dora=True)
    ref = registry.push(adapter, "sql", annotations={"eval.acc": "0.91", "hf.repo": "acme/origin"})
    code, output = cli("copy", "sql@v1", "--to", "hf://acme/sql-dora")
    assert code == 0 and output.startswith("sql@v1 → hf://acme/sql-dora (http://127.0.0.1:"), output

    commit, = hub.commits
    assert commit["repo"] == "acme/sql-dora" and commit["revision"] == "main"
    assert ref.digest in commit["summary"]
    assert sorted(commit["files"]) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    pulled = registry.pull("sql@v1", tmp_path / "pulled")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert commit["files"][name] == (pulled / name).read_bytes(), name
    assert read_safetensors(commit["files"]["adapter_model.safetensors"])[0] == adapter.tensors
    assert json.loads(commit["files"]["adapter_config.json"]) == adapter.config.to_dict()

    card = commit["files"]["README.md"].decode()
    assert card.startswith("---\n") and "library_name: peft" in card.split("---")[1]
    for text in ("sql@v1", ref.digest, "`eval.acc`", "0.91", "`hf.repo`", "acme/origin", "DoRA"):
        assert text in card, text
    assert hub.validated == [card]  # the metadata went through the Hub's check
    assert set(hub.authorizations) == {"Bearer hf_test_token"}  # HF_TOKEN, read when the command ran

    # what was uploaded is a PEFT directory adapterhub (and so PEFT) reads as the same adapter
    (tmp_path / "hub").mkdir()
    for name, data in commit["files"].items():
        (tmp_path / "hub" / name).write_bytes(data)
    assert Adapter.from_peft_dir(tmp_path / "hub").tensors == adapter.tensors


def test_hub_upload_errors_are_one_line(hub, home, monkeypatch):
    Registry().push(make_adapter(), "sql")
    code, output = cli("copy", "sql@v1", "--to", "hf://acme/sql", "--tags", "prod")
    assert_one_line_error(code, output, "--to")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, output = cli("copy", "sql@v1", "--to", "hf://acme/sql")
    assert_one_line_error(code, output, "HF_HUB_OFFLINE=1", "hf://acme/sql")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    code, output = cli("copy", "sql@v1", "--to", "hf://acme/sql@no-such-branch")
    assert_one_line_error(code, output, "upload of sql@v1 to hf://acme/sql@no-such-branch failed")
    assert not hub.commits
