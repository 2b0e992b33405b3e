"""Locate Wattlane's data files: the ones inside the installed package, and the larger ones only a source checkout carries.

Packaged (in the wheel, under scheduler/data/): the Azure LLM 2023 conversation trace, the held-out
routing prompts the simulator's model selection draws from, and the simulated-fleet config. Repository
only (under data/ at the root of a clone): the full routing labels the predictor is trained on and the
ML.ENERGY table the simulator is fitted to; the tools that need them (training, evaluation, fitting,
benchmarks) run from a clone. Provenance and licence of each file: scheduler/data/README.md and
data/*/README.md.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: the root of the source checkout this package sits in (meaningless for an installed wheel)
REPOSITORY_DIR = Path(__file__).resolve().parents[1]

CONVERSATION_TRACE = "azure-llm-2023-conv.csv.gz"
HELD_OUT_PROMPTS = "routing-held-out.csv.gz"
SIM_FLEET_CONFIG = "sim-fleet.yaml"

ROUTING_CSVS = {"mmlu": "routing/mmlu.csv.gz", "gsm8k": "routing/gsm8k.csv.gz"}
REFERENCE_CSV = "reference/mlenergy_v3_lm_arena_chat.csv.gz"


class DataFileError(FileNotFoundError):
    """A data file is missing; the message says which and where it comes from."""


def _package_file(folder: str, name: str) -> Path:
    # the wheel installs as plain files, so the resource is a real path that pandas and gzip can open
    path = Path(str(resources.files("scheduler").joinpath(folder, name)))
    if not path.is_file():
        raise DataFileError(f"{path}: packaged data file missing; reinstall wattlane")
    return path


def packaged(name: str) -> Path:
    """A file of scheduler/data/ in the installed package."""
    return _package_file("data", name)


def conversation_trace() -> Path:
    """The Azure LLM inference trace 2023, conversation services (19,366 requests over one hour), gzipped."""
    return packaged(CONVERSATION_TRACE)


def held_out_prompts() -> Path:
    """The held-out routing split (written by `python -m scheduler.routing.train`), gzipped CSV."""
    return packaged(HELD_OUT_PROMPTS)


def sim_fleet_config() -> Path:
    """The simulated 8-GPU H100 fleet `wattlane simulate` replays on by default."""
    return _package_file("default_configs", SIM_FLEET_CONFIG)


def repository_file(relative: str) -> Path:
    """A file under data/ of the source checkout; repository tools only, so the message says to run from a clone."""
    path = REPOSITORY_DIR / "data" / relative
    if not path.is_file():
        raise DataFileError(
            f"{path}: not found; data/{relative} ships with the Wattlane source repository, not with the installed "
            "package: run this tool from a clone"
        )
    return path


def routing_csv(dataset: str) -> Path:
    """The RouteLLM routing labels of one benchmark ('mmlu' or 'gsm8k')."""
    return repository_file(ROUTING_CSVS[dataset])


def reference_csv() -> Path:
    """The ML.ENERGY leaderboard v3 table (LM Arena chat) the simulator's profiles are fitted to."""
    return repository_file(REFERENCE_CSV)
