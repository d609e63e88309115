"""ORAS both ways, through a real docker-registry on 127.0.0.1 and oras-py's own client: a PEFT directory
pushed with `oras push` pulls with adapterhub, and `copy --oras-files` writes what `oras pull` turns into
a PEFT directory that PEFT loads; anything else is a one-line error naming its media types."""

from __future__ import annotations

import json

import pytest

from adapterhub import Registry
from adapterhub.adapter import read_safetensors
from adapterhub.errors import IntegrityError
from tests.registry.helpers import assert_one_line_error, cli, make_adapter
from tests.registry.hostile_registry import docker_registry

oras_client = pytest.importorskip("oras.client")


@pytest.fixture(scope="module")
def oci_url(tmp_path_factory):
    with docker_registry(tmp_path_factory.mktemp("oras")) as url:
        yield url


def _target(oci_url: str, task: str, tag: str) -> str:
    return f"{oci_url.removeprefix('oci://')}/{task}:{tag}"


def _oras_push(oci_url, directory, task, tag, names, monkeypatch):
    """`oras push host/team/TASK:TAG NAME...` from inside `directory` (oras-py wants paths under the cwd)."""
    with monkeypatch.context() as patch:
        patch.chdir(directory)
        oras_client.OrasClient(insecure=True).push(target=_target(oci_url, task, tag), files=list(names))


def _tensors(path):
    return read_safetensors((path / "adapter_model.safetensors").read_bytes())[0]


def test_oras_pushed_peft_dir_pulls_as_the_same_peft_dir(oci_url, tmp_path, monkeypatch):
    adapter = make_adapter(seed=3, use_dora=True)
    source = adapter.save_peft_dir(tmp_path / "peft")
    (source / "README.md").write_text("a model card oras pushes along; it travels with the version")
    _oras_push(oci_url, source, "orased", "v1", ["adapter_config.json", "adapter_model.safetensors", "README.md"],
               monkeypatch)

    remote = Registry(oci_url)
    assert remote.versions("orased") == [1]
    code, listing = cli("ls", "orased", "-r", oci_url)  # listed as a version, with no warning
    assert code == 0 and listing.startswith("orased@v1\t") and listing.count("\n") == 1, listing
    out = remote.pull("orased@v1", tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (out / "README.md").read_bytes() == (source / "README.md").read_bytes()
    assert _tensors(out) == adapter.tensors
    assert json.loads((out / "adapter_config.json").read_text()) == adapter.config.to_dict()
    assert (out / "adapter_model.safetensors").read_bytes() == (source / "adapter_model.safetensors").read_bytes()

    code, output = cli("pull", "orased@v1", "-r", oci_url, "-o", tmp_path / "cli")  # what a user types
    assert code == 0 and _tensors(tmp_path / "cli") == adapter.tensors, output
    local = Registry(tmp_path / "local")  # copied in, it is an ordinary per-tensor version
    assert str(remote.copy("orased@v1", local)) == "orased@v1" and local.load("orased@v1").tensors == adapter.tensors
    assert local.verify().ok


def test_an_oras_artifact_without_a_version_tag_says_how_to_tag_it(oci_url, tmp_path, monkeypatch):
    source = make_adapter(seed=4).save_peft_dir(tmp_path / "peft")
    _oras_push(oci_url, source, "untagged", "latest", ["adapter_config.json", "adapter_model.safetensors"],
               monkeypatch)
    with pytest.raises(IntegrityError, match="no vN tag"):
        Registry(oci_url).load("untagged")
    _oras_push(oci_url, source, "untagged", "v1", ["adapter_config.json", "adapter_model.safetensors"], monkeypatch)
    assert Registry(oci_url).load("untagged").tensors == make_adapter(seed=4).tensors  # latest = the v1 manifest


def test_an_artifact_that_is_no_adapter_is_one_line_naming_its_media_types(oci_url, tmp_path, monkeypatch):
    (tmp_path / "chart.tgz").write_bytes(b"\x1f\x8b not an adapter")
    _oras_push(oci_url, tmp_path, "chart", "v1", ["chart.tgz:application/vnd.cncf.helm.chart.content.v1.tar+gzip"],
               monkeypatch)
    code, output = cli("pull", "chart@v1", "-r", oci_url, "-o", tmp_path / "out")
    assert_one_line_error(code, output, "is not an adapter", "application/vnd.cncf.helm.chart.content.v1.tar+gzip",
                          "chart.tgz", "artifactType")
    assert not (tmp_path / "out").exists()


@pytest.mark.compat
def test_copy_oras_files_pulls_with_oras_into_a_dir_peft_loads(oci_url, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from tests.registry.hub_fixtures import peft_adapter, tiny_base

    base = tiny_base(tmp_path / "base")
    saved = peft_adapter(base, tmp_path / "dora", use_dora=True, seed=6)
    local = Registry(tmp_path / "store")
    ref = local.push(saved, "peftdora", tags=["prod"], annotations={"eval.acc": "0.9"})
    code, output = cli("copy", "peftdora@v1", "--to", oci_url, "--oras-files", "-r", tmp_path / "store")
    assert code == 0 and output.rstrip().endswith(f"peftdora@v1 → {oci_url}"), output

    pulled = tmp_path / "oras-pulled"
    files = oras_client.OrasClient(insecure=True).pull(target=_target(oci_url, "peftdora", "prod"), outdir=str(pulled))
    assert sorted(p.rsplit("/", 1)[-1] for p in files) == ["README.md", "adapter_config.json",
                                                            "adapter_model.safetensors"]  # PEFT's card travels
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(model, pulled).state_dict()
    original = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), saved).state_dict()
    adapter_keys = [k for k in original if "lora_" in k]
    assert adapter_keys and any(original[k].abs().max() > 0 for k in adapter_keys if "lora_B" in k)
    for key in adapter_keys:
        assert torch.equal(loaded[key], original[key]), key

    # adapterhub reads the file variant back as the very same version (the same manifest bytes)
    remote = Registry(oci_url)
    assert remote.resolve("peftdora:prod").version == 1 and remote.log("peftdora")[0].annotations == {"eval.acc": "0.9"}
    back = Registry(tmp_path / "back")
    remote.copy("peftdora:prod", back)
    assert back.resolve("peftdora@v1").digest == ref.digest and back.tags("peftdora")["prod"].version == 1


def test_oras_files_needs_an_oci_destination(tmp_path, home):
    Registry().push(make_adapter(), "sql")
    code, output = cli("copy", "sql@v1", "--to", tmp_path / "elsewhere", "--oras-files")
    assert_one_line_error(code, output, "--oras-files", "oci://")
