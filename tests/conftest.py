import logging

import pytest
import torch

from pipeline.data.synthetic import make_synthetic

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_logging():
    """Entry points called in-process (``dinat-bench``'s main) replace the root logger's handlers, pytest's
    capture handler included; put them back so that later tests' caplog sees what it expects."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A tiny synthetic shard set (4 classes, 192 + 32 images of 48 px, 24 per shard) for end-to-end runs."""
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic(out, num_classes=4, train_per_class=48, val_per_class=8, image_size=48, shard_samples=24)
    return out
