"""The Ray Serve settings: validated once, mapped onto Ray Serve's deployment options; the CLI's options."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from adapterhub.cli import main
from adapterhub.errors import ConfigError

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'adapterhub[ray]')")

from adapterhub.serve.ray import RayServeConfig, parse_autoscale  # noqa: E402  (imports ray)


def test_replicas_and_autoscale_map_onto_ray_serve_options():
    fixed = RayServeConfig(replicas=3, max_batch=8, max_queue=20, replica_cpus=2).replica_options()
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] == 8 and fixed["max_queued_requests"] == 20
    assert fixed["ray_actor_options"] == {"num_cpus": 2}
    scaled = RayServeConfig.from_args({"autoscale": "1,4", "max_batch": 8}).replica_options()
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1,
                                            "target_ongoing_requests": 4}
    assert RayServeConfig(replica_cpus=0.5).torch_threads == 1 and RayServeConfig(replica_cpus=4).torch_threads == 4


def test_the_engine_config_of_a_replica_follows_the_settings():
    engine = RayServeConfig(base="tiny", max_batch=4, max_queue=2, max_seq=64, allow_base_mismatch=True).engine_config()
    assert (engine.max_batch, engine.max_seq, engine.base_name, engine.allow_base_mismatch) == (4, 64, "tiny", True)
    assert engine.max_queue >= engine.max_batch  # a replica always has room for what Ray sends it


@pytest.mark.parametrize("args, words", [
    ({"autoscale": "3,1"}, "autoscale"),
    ({"autoscale": "two,four"}, "MIN,MAX"),
    ({"routing": "random"}, "routing"),
    ({"replicas": 0}, "replicas is 0"),
    ({"max_adapters": 0}, "max_adapters is 0"),
    ({"dtype": "int8"}, "dtype"),
    ({"workers": 2}, "unknown Ray Serve args ['workers']"),
])
def test_bad_settings_are_one_config_error_naming_the_value(args, words):
    with pytest.raises(ConfigError, match=None) as raised:
        RayServeConfig.from_args(args)
    assert words in str(raised.value)


def test_parse_autoscale():
    assert parse_autoscale("1,4") == (1, 4)
    with pytest.raises(ConfigError, match="MIN,MAX"):
        parse_autoscale("4")


def test_serve_rejects_bad_ray_options_in_one_line_before_starting_ray():
    result = CliRunner().invoke(main, ["serve", "--autoscale", "5,2"])
    assert result.exit_code == 1
    assert "ConfigError" in result.output and "autoscale is (5, 2)" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_only_serve_ray_imports_ray_at_module_level():
    """`pip install adapterhub` without the extra must keep working: ray is imported by adapterhub/serve/ray/
    and, lazily, by the CLI's --replicas branch, nowhere else."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "adapterhub"
    importers = set()
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            if any(name == "ray" or name.startswith("ray.") for name in names):
                importers.add(path.relative_to(package).parts[:2])
    assert importers == {("serve", "ray")}, importers
