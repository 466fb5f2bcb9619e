"""Shared test setup: one thread (tiny matmuls are slow with a contended pool), fixed seeds, no hub."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_lm():
    """(model, tokenizer): a tiny random GPT-2 and byte-level BPE tokenizer, built in-process."""
    from fixtures import tiny_causal_lm

    return tiny_causal_lm(seed=0)


@pytest.fixture(scope="session")
def tiny_lm_dir(tiny_lm, tmp_path_factory):
    """A directory with ``save_pretrained`` of the tiny model (safetensors) and its tokenizer."""
    model, tok = tiny_lm
    d = tmp_path_factory.mktemp("tiny_lm")
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def fresh_accelerate_state():
    """Each trainer builds its own Accelerator; accelerate keeps process-wide singletons."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
