"""The real SmolLM2-135M on llama.cpp (CPU, one thread), shared by the engine tests of a module."""

from __future__ import annotations

import asyncio

import pytest

from scheduler.engines.base import ModelKind
from scheduler.engines.llamacpp import LlamaCppEngine
from tests.support.local_models import smollm2_weights


@pytest.fixture(scope="module")
def engine():
    eng = LlamaCppEngine("smollm2-135m-instruct", ModelKind.CHAT, smollm2_weights(), context_length=2048, n_threads=1)
    yield eng
    asyncio.run(eng.close())
