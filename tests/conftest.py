import pytest
import torch

from spectra.config import ModelConfig


@pytest.fixture(autouse=True)
def _torch_defaults():
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(torch.float32)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def tiny_config(**overrides) -> ModelConfig:
    """2 layers, dim 64: the house test model."""
    cfg = dict(dim=64, n_layers=2, n_heads=4, glu_dim=128, vocab_size=256, max_seq_len=128)
    cfg.update(overrides)
    return ModelConfig(**cfg)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_config()
