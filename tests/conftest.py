import atexit
import os
import shutil
import tempfile

import pytest
import torch

from spectra.config import ModelConfig

# lm-eval's `datasets` converts the tests' JSON tasks to Arrow in this cache: one folder for the whole session,
# removed at exit (set before any test module imports `datasets`, which reads it once).
if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="spectra-test-hf-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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


def ternary_codes(N: int, Kdim: int, shards: int = 1, dim: int = 0, seed: int = 0):
    """Random ternary codes of an [N, Kdim] layer as (TQ2 code bytes, TQ1 code bytes, bounds, seg_d) tensors, with
    `shards` scales along `dim` and an all-zero run of blocks in row N // 2 (d = 0): the kernels' test matrices."""
    import numpy as np

    from spectra.packed import formats as F

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (N, Kdim), generator=g, dtype=torch.int8)
    codes[N // 2, : min(Kdim, 512)] = 0
    qs, d = F.blocks_from_ternary(codes, 0.01 + 0.04 * torch.rand(shards, generator=g), dim)
    bounds, seg_d = F.scale_segments(d)
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in (qs, F.tq1_code_bytes(qs), bounds, seg_d))


def non_finite_input(T: int, Kdim: int, nan_row: int, inf_row: int):
    """(x [T, Kdim] with a NaN in row nan_row and an inf in row inf_row, mask of the other rows): a kernel must give
    the reference's outputs on the masked rows and NaN on the two others."""
    x = torch.randn(T, Kdim)
    x[nan_row, 3] = float("nan")
    x[inf_row, 9] = float("inf")
    ok = torch.ones(T, dtype=torch.bool)
    ok[[nan_row, inf_row]] = False
    return x, ok


def assert_rows_or_nan(y, ref, ok) -> None:
    """y equals ref on the rows of `ok` and is NaN on the others."""
    assert torch.equal(y[ok], ref[ok]) and y[~ok].isnan().all()


def byte_bpe(text: str, vocab_size: int, special_tokens: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer trained on `text` repeated (the tests' small tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    t.train_from_iterator([text] * 9, trainer)
    return t


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_config()
