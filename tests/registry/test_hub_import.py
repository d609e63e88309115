"""The Hugging Face Hub as a source, offline: PEFT repos saved by PEFT on a tiny base, placed in a real HF
cache layout (hub_fixtures.py), imported with `push hf://…`, pulled back, served, and pulled through."""

from __future__ import annotations

import json

import pytest

from adapterhub import Registry
from adapterhub.adapter import Adapter, check_fits, read_safetensors
from adapterhub.errors import AdapterFormatError, RefNotFoundError
from adapterhub.registry.hub import HubSettings, HubSource, default_task, pull_through
from tests.registry.helpers import assert_one_line_error, cli
from tests.registry.hub_fixtures import hf_home, peft_adapter, peft_files, tiny_base, write_hf_cache  # noqa: F401

pytestmark = pytest.mark.compat
torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny base and two adapters PEFT saved on it: {"base": dir, "lora": dir, "dora": dir}."""
    root = tmp_path_factory.mktemp("peft")
    base = tiny_base(root / "base")
    return {"base": base, "lora": peft_adapter(base, root / "lora", seed=1),
            "dora": peft_adapter(base, root / "dora", use_dora=True, seed=2)}


def _tensors(directory):
    return read_safetensors((directory / "adapter_model.safetensors").read_bytes())[0]


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_push_from_the_hf_cache_round_trips_and_records_lineage(saved, hf_home, home, tmp_path, kind):
    commit = write_hf_cache(hf_home, f"acme/{kind}-sql", peft_files(saved[kind]))
    code, output = cli("push", f"hf://acme/{kind}-sql", "sql", "--tag", "prod")
    assert code == 0 and output.rstrip().endswith("sql@v1"), output  # after the progress bar

    registry = Registry()
    notes = registry.log("sql")[0].annotations
    assert notes == {"hf.repo": f"acme/{kind}-sql", "hf.revision": "main", "hf.commit": commit}
    out = registry.pull("sql:prod", tmp_path / "out")
    original = _tensors(saved[kind])
    assert any(t.to_float32().any() for k, t in original.items() if ".lora_B." in k)  # not a zero adapter
    assert _tensors(out) == original  # dtype, shape and bytes of every tensor
    assert peft_files(out) == peft_files(saved[kind])  # and the two files PEFT wrote, byte for byte
    assert (json.loads((out / "adapter_config.json").read_text())
            == json.loads((saved[kind] / "adapter_config.json").read_text()))
    # the same content pushed from the directory is the same version: nothing of the import differs but lineage
    direct = registry.push(saved[kind], "direct")
    assert registry.manifest(direct).tensors == registry.manifest("sql@v1").tensors


def test_a_revision_resolves_to_its_commit_and_a_commit_can_be_named(saved, hf_home, home):
    first = write_hf_cache(hf_home, "acme/sql", peft_files(saved["lora"]))
    second = write_hf_cache(hf_home, "acme/sql", peft_files(saved["dora"]), revision="exp")
    registry = Registry()
    assert str(registry.push("hf://acme/sql@exp", "sql")) == "sql@v1"
    assert str(registry.push(f"hf://acme/sql@{first}", "sql")) == "sql@v2"
    log = {e.ref.version: e.annotations for e in registry.log("sql")}
    assert log[1]["hf.commit"] == second and log[1]["hf.revision"] == "exp"
    assert log[2]["hf.commit"] == first and log[2]["hf.revision"] == first
    assert registry.load("sql@v1").config.use_dora and not registry.load("sql@v2").config.use_dora


def test_imported_adapter_serves_like_the_peft_dir_and_like_peft(saved, hf_home, home):
    import peft
    import transformers

    from adapterhub.runtime import load_base

    write_hf_cache(hf_home, "acme/dora", peft_files(saved["dora"]))
    registry = Registry()
    ref = registry.push("hf://acme/dora", "dora")
    base = load_base(saved["base"], quantize=None, compute_dtype=torch.float32)
    base.add_adapter(f"dora@{ref.digest}", name="hub", registry=registry)
    base.add_adapter(Adapter.from_peft_dir(saved["dora"]), name="dir")
    ids = torch.randint(0, 96, (3, 6), generator=torch.Generator().manual_seed(0))
    hub, direct, plain = base(ids, adapters=["hub"] * 3), base(ids, adapters=["dir"] * 3), base(ids)
    assert (hub - plain).abs().max() > 1e-3  # the adapter changes the output
    assert torch.equal(hub, direct)

    hf = transformers.AutoModelForCausalLM.from_pretrained(saved["base"], dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf, saved["dora"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(hub, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_pickle_only_repo_is_refused_in_one_line(hf_home, home):
    files = {"adapter_config.json": json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}).encode(),
             "adapter_model.bin": b"\x80\x04not loaded"}
    write_hf_cache(hf_home, "acme/pickled", files)
    with pytest.raises(AdapterFormatError, match="adapter_model.bin, a pickle"):
        Registry().push("hf://acme/pickled", "sql")
    code, output = cli("push", "hf://acme/pickled", "sql")
    assert_one_line_error(code, output, "hf://acme/pickled", "adapter_model.bin", "never loads")
    assert Registry().tasks() == []


def test_missing_repo_or_revision_offline_is_one_line_naming_what_is_cached(saved, hf_home, home):
    write_hf_cache(hf_home, "acme/sql", peft_files(saved["lora"]))
    code, output = cli("push", "hf://acme/nothing", "sql")
    assert_one_line_error(code, output, "hf://acme/nothing", "not in", "HF_HUB_OFFLINE=1")
    code, output = cli("push", "hf://acme/sql@v9", "sql")
    assert_one_line_error(code, output, "hf://acme/sql@v9", "revision 'v9'", "cached: ", "main")
    code, output = cli("push", "hf://not a repo", "sql")
    assert_one_line_error(code, output, "not a Hugging Face repo id")
    with pytest.raises(RefNotFoundError):
        Registry().push("hf://acme/sql@v9", "sql")


def test_settings_follow_the_environment_at_call_time():
    settings = HubSettings.from_env({"HF_HOME": "/h", "HF_HUB_OFFLINE": "1", "HF_TOKEN": "t",
                                     "HF_ENDPOINT": "http://127.0.0.1:9/"})
    assert settings == HubSettings(True, "/h/hub", "t", "http://127.0.0.1:9")
    assert HubSettings.from_env({"HF_HUB_CACHE": "/c", "HF_HOME": "/h"}).cache_dir == "/c"
    assert not HubSettings.from_env({}).is_offline
    assert HubSource.parse("hf://acme/sql@refs/pr/1") == HubSource("acme/sql", "refs/pr/1")
    assert default_task("Acme-Labs/SQL_lora.v2") == "hf.acme-labs.sql-lora-v2"
    assert len(default_task("a/" + "b" * 96)) <= 64


def test_generate_pulls_through_once_per_commit(saved, hf_home, home):
    """generate --adapter hf://… imports on first use; the second run reuses that version by its lineage
    without reading the files again (the cached weights are corrupted in between); a moved branch is a
    new commit, imported as the next version."""
    commit = write_hf_cache(hf_home, "acme/sql", peft_files(saved["lora"]))
    args = ["generate", "--base", saved["base"], "--quantize", "none", "-n", "6", "--seed", "0", "ab"]
    code, via_hub = cli(*args[:-1], "--adapter", "hf://acme/sql", "ab")
    assert code == 0, via_hub
    code, via_dir = cli(*args[:-1], "--adapter", str(saved["lora"]), "ab")
    code_plain, plain = cli(*args)
    assert code == 0 and code_plain == 0 and via_hub == via_dir, (via_hub, via_dir)
    assert via_hub != plain  # the adapter changes the completion
    registry = Registry()
    assert registry.tasks() == ["hf.acme.sql"] and registry.versions("hf.acme.sql") == [1]

    weights = peft_files(saved["lora"])["adapter_model.safetensors"]
    blob, = [b for b in (hf_home / "hub" / "models--acme--sql" / "blobs").iterdir() if b.read_bytes() == weights]
    blob.write_bytes(b"corrupt: a re-import would fail")
    code, again = cli(*args[:-1], "--adapter", "hf://acme/sql", "ab")
    assert code == 0 and again == via_hub and registry.versions("hf.acme.sql") == [1]
    assert pull_through(registry, "hf://acme/sql").version == 1

    moved = write_hf_cache(hf_home, "acme/sql", peft_files(saved["dora"]))
    assert moved != commit
    ref = pull_through(registry, "hf://acme/sql")
    assert ref.version == 2 and registry.log("hf.acme.sql")[0].annotations["hf.commit"] == moved


def test_server_imports_hub_models_only_with_allow_hub(saved, hf_home, home):
    from adapterhub.serve.loader import AdapterSource

    write_hf_cache(hf_home, "acme/sql", peft_files(saved["lora"]))
    registry = Registry()
    shapes = Adapter.from_peft_dir(saved["lora"]).module_shapes()

    def check(adapter, name):  # the server passes its pool's check
        return check_fits(adapter, shapes, name)

    with pytest.raises(RefNotFoundError, match="--allow-hub"):
        AdapterSource(registry, check, "tiny").resolve("hf://acme/sql")
    assert registry.tasks() == []
    source = AdapterSource(registry, check, "tiny", allow_hub=True)
    first = source.resolve("hf://acme/sql")
    assert first.label == "hf.acme.sql@v1" and first.digest == registry.resolve("hf.acme.sql").digest
    assert source.load(first).tensors == Adapter.from_peft_dir(saved["lora"]).tensors
    write_hf_cache(hf_home, "acme/sql", peft_files(saved["dora"]))  # moved on the Hub: the server stays pinned
    assert source.resolve("hf://acme/sql") == first and registry.versions("hf.acme.sql") == [1]


def test_http_request_naming_a_hub_model_imports_it_on_first_use(saved, hf_home, home):
    import httpx

    from adapterhub.runtime import load_base
    from adapterhub.serve.api import create_app
    from adapterhub.serve.engine import Engine, EngineConfig
    from adapterhub.serve.server import serve_in_thread

    write_hf_cache(hf_home, "acme/sql", peft_files(saved["lora"]))
    registry = Registry()
    body = {"prompt": "ab", "max_tokens": 6, "temperature": 0}
    for allow_hub in (False, True):
        base = load_base(saved["base"], quantize=None, compute_dtype=torch.float32)
        engine = Engine(base, registry, EngineConfig(max_batch=2, allow_hub=allow_hub))
        try:
            with serve_in_thread(create_app(engine, api_key="")) as url, httpx.Client(base_url=url, timeout=120) as c:
                hub = c.post("/v1/completions", json={**body, "model": "hf://acme/sql"})
                if not allow_hub:
                    assert hub.status_code == 404 and "--allow-hub" in hub.text and registry.tasks() == []
                    continue
                assert hub.status_code == 200, hub.text
                assert registry.versions("hf.acme.sql") == [1]
                pushed = c.post("/v1/completions", json={**body, "model": "hf.acme.sql@v1"}).json()
                plain = c.post("/v1/completions", json={**body, "model": base.name}).json()
        finally:
            engine.close()
    text = hub.json()["choices"][0]["text"]
    assert text == pushed["choices"][0]["text"] and text != plain["choices"][0]["text"]
