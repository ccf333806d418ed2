"""Shared fixtures. Tests never touch the network: the real dataset comes from LORA_LAB_DATA
(CI points it at the offline copy); tests that need it skip with a clear reason when it is unset."""

import os

import pytest
import torch

from lora_lab import GPTConfig


@pytest.fixture
def tiny_config() -> GPTConfig:
    return GPTConfig(vocab_size=17, block_size=16, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def real_data_source() -> str:
    source = os.environ.get("LORA_LAB_DATA")
    if not source:
        pytest.skip("LORA_LAB_DATA is not set: no offline copy of tiny-shakespeare to test against")
    return source


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The test models are tiny: a second thread gains nothing, and on a busy machine its barriers cost ~10x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # No test may read or write the user's real model cache.
    monkeypatch.setenv("LORA_LAB_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
