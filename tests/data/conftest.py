"""Tiny corpora shared by the data tests (written once per session)."""

import pytest

from fastvl.data import SyntheticConfig, synthetic_corpus

TINY = SyntheticConfig(seed=3, n_train_images=48, n_val_images=12, captions_per_image=2, img_dim=16, n_classes=6)


@pytest.fixture(scope="session")
def tiny_config():
    return TINY


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    return synthetic_corpus(tmp_path_factory.mktemp("cache"), TINY)
