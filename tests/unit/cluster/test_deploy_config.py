"""`wattlane deploy-config`: the file it writes is a Serve config Serve's own schema accepts, and what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema
from typer.testing import CliRunner

from scheduler.cli import _register_all, app

REPO = Path(__file__).resolve().parents[3]
runner = CliRunner()
_register_all()


def test_written_file_is_a_serve_deploy_schema_with_the_config_as_args(tmp_path):
    out = tmp_path / "serve.yaml"
    r = runner.invoke(app, ["deploy-config", "--config", str(REPO / "configs" / "sim-fleet.yaml"),
                            "--state-dir", "/var/lib/wattlane", "--port", "9100", "--out", str(out)])
    assert r.exit_code == 0, r.output
    data = yaml.safe_load(out.read_text())
    schema = ServeDeploySchema.model_validate(data)  # what `serve deploy` validates the file with
    assert schema.http_options.port == 9100 and str(schema.proxy_location.value) == "HeadOnly"
    (application,) = schema.applications
    assert application.import_path == "scheduler.cluster.serve_app:app_builder"
    assert application.runtime_env["env_vars"]["WATTLANE_STATE_DIR"] == "/var/lib/wattlane"
    config = application.args["config"]
    assert [m["id"] for m in config["models"]] == ["llama-3.1-8b", "llama-3.1-70b"]
    # the builder validates what it is given as load_config would
    from scheduler.config import validate_config_mapping

    assert validate_config_mapping(config, source=application.args["source"]).models[1].replicas == 1


def test_relative_state_dir_and_unknown_proxy_location_are_refused(tmp_path):
    sim = str(REPO / "configs" / "sim-fleet.yaml")
    r = runner.invoke(app, ["deploy-config", "--config", sim, "--state-dir", "relative/state"])
    assert r.exit_code == 2 and "relative" in r.output and "every node" in r.output
    r = runner.invoke(app, ["deploy-config", "--config", sim, "--state-dir", "/s", "--proxy-location", "Nowhere"])
    assert r.exit_code == 2 and "HeadOnly" in r.output


@pytest.mark.parametrize("port", ["0", "-1", "65536", "99999"])
@pytest.mark.parametrize("command", ["deploy-config", "serve"])
def test_a_port_outside_1_to_65535_is_a_configuration_error(tmp_path, command, port):
    # serve's check comes before anything starts (it was pydantic's ValidationError from the assignment);
    # deploy-config wrote a Serve config with the port (and took 0 for the config's port)
    out = tmp_path / "serve.yaml"
    args = ["--state-dir", "/var/lib/wattlane", "--out", str(out)] if command == "deploy-config" else []
    r = runner.invoke(app, [command, f"--port={port}", *args])
    assert r.exit_code == 2, (r.exception, r.output)
    assert f"configuration error: --port: port {port} is not a TCP port" in r.output and "from 1 to 65535" in r.output
    assert not out.exists()


def test_builder_refuses_args_without_a_config():
    import pytest

    from scheduler.cluster.serve_app import app_builder

    with pytest.raises(ValueError, match="deploy-config"):
        app_builder({"state_dir": "/tmp/x"})


def test_kuberay_example_carries_a_serve_config_and_a_wattlane_config_that_validate():
    from scheduler.config import validate_config_mapping

    manifest = yaml.safe_load((REPO / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    (application,) = serve_config.applications
    assert application.import_path == "scheduler.cluster.serve_app:app_builder"
    validate_config_mapping(application.args["config"], source=application.args["source"])
    workers = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert all("nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in workers)


def test_autoscaling_becomes_serves_autoscaling_config_up_to_replicas():
    import pytest

    from scheduler.cluster.serve_app import replica_count_options
    from scheduler.config import ModelConfig

    fixed = ModelConfig.model_validate({"id": "m", "kind": "chat", "engine": "simulated", "replicas": 2})
    assert replica_count_options(fixed) == {"num_replicas": 2}
    scaled = ModelConfig.model_validate({"id": "m", "kind": "chat", "engine": "simulated", "replicas": 4,
                                         "autoscaling": {"min_replicas": 1, "downscale_delay_seconds": 90}})
    auto = replica_count_options(scaled)["autoscaling_config"]
    assert (auto["min_replicas"], auto["initial_replicas"], auto["max_replicas"]) == (1, 1, 4)
    assert auto["downscale_delay_s"] == 90
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**auto)  # Serve accepts it
    with pytest.raises(ValueError, match="min_replicas"):
        ModelConfig.model_validate({"id": "m", "kind": "chat", "engine": "simulated", "replicas": 1,
                                    "autoscaling": {"min_replicas": 2}})
