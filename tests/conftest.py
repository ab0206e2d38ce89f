"""Shared fixtures. Real checkpoints and data must be present under CI (CI=true): missing ones fail
there instead of skipping; on a developer machine they skip with the install command."""

import os
from pathlib import Path

import pytest
from tiny_models import FAMILIES

from hf_prune.errors import UsageError
from hf_prune.pypi_checkpoints import find_pypi_checkpoint

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "HF_PRUNE_DATA_DIR" not in os.environ and SHARED_DATA.is_dir():
    os.environ["HF_PRUNE_DATA_DIR"] = str(SHARED_DATA)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def require(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"required under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def smollm2() -> tuple[Path, dict]:
    try:
        return find_pypi_checkpoint("smollm2-135m-instruct")
    except UsageError as error:
        require(str(error))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A saved tiny Llama checkpoint folder (tests/tiny_models.py), for the CLI tests."""
    folder = tmp_path_factory.mktemp("models") / "llama"
    FAMILIES["llama"].build().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on shared CPU cores: one intra-op thread is ~8× faster than oversubscribed threads."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
