"""The config's allowed engine, power policy and carbon provider names are exactly their registries'."""

from __future__ import annotations

import importlib
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from scheduler.config import CarbonConfig, ConfigError, ModelConfig, PowerGroupConfig, load_config
from scheduler.energy.carbon import CARBON_PROVIDERS
from scheduler.engines.base import ENGINE_BUILDERS, Engine
from scheduler.power.policies import POLICIES, Policy

MODEL = """
models:
  - id: tiny
    kind: completion
    engine: ENGINE
    weights: {path: WEIGHTS}
"""


def allowed(model: type, field: str) -> set[str]:
    return set(typing.get_args(model.model_fields[field].annotation))


def test_allowed_values_come_from_the_registries():
    assert allowed(ModelConfig, "engine") == set(ENGINE_BUILDERS) == {"llamacpp", "simulated", "openai"}
    assert allowed(PowerGroupConfig, "policy") == set(POLICIES) == {
        "none", "static", "slo-feedback", "budget", "carbon-aware", "parking"}
    assert allowed(CarbonConfig, "provider") == set(CARBON_PROVIDERS) == {"codecarbon", "fixed", "csv", "http"}


def test_every_registered_engine_builder_is_importable():
    for name, spec in ENGINE_BUILDERS.items():
        module, _, function = spec.partition(":")
        builder = getattr(importlib.import_module(module), function)
        assert callable(builder), name
        # the builder's return annotation names an Engine subclass of that module
        returned = typing.get_type_hints(builder)["return"]
        assert issubclass(returned, Engine), name


def test_every_registered_policy_names_itself_and_its_options():
    for name, cls in POLICIES.items():
        assert issubclass(cls, Policy) and cls.name == name
        assert issubclass(cls.options_model, BaseModel), name
    assert POLICIES["carbon-aware"].needs_carbon_intensity and not POLICIES["budget"].needs_carbon_intensity


def test_an_unknown_engine_lists_the_registered_ones(tmp_path: Path):
    (tmp_path / "w.gguf").write_bytes(b"GGUF")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(MODEL.replace("ENGINE", "vllm").replace("WEIGHTS", str(tmp_path / "w.gguf")))
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert exc.value.key == "models[0] (id tiny).engine"
    assert all(name in exc.value.fix for name in ENGINE_BUILDERS)


def test_an_unknown_policy_lists_the_registered_ones(tmp_path: Path):
    (tmp_path / "w.gguf").write_bytes(b"GGUF")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(MODEL.replace("ENGINE", "llamacpp").replace("WEIGHTS", str(tmp_path / "w.gguf"))
                   + "power:\n  groups:\n    - {name: g, devices: [cpu0], policy: turbo}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert exc.value.key == "power.groups[0].policy"
    assert all(name in exc.value.fix for name in POLICIES)
