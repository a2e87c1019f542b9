"""Shared test fixtures: where the real data lives.

The real datasets are never committed; tests read them from ``../shared/data`` beside the checkout,
or from the directory named by ``GR_JAX_DATA``. A test that needs a file skips with a message naming
the missing path only when that file is truly absent.
"""
import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = pathlib.Path(os.environ.get("GR_JAX_DATA", REPO_ROOT.parent / "shared" / "data"))
REFERENCE_DIR = pathlib.Path(
    os.environ.get("GR_JAX_REFERENCE", REPO_ROOT.parent / "shared" / "reference"))


def _require(path: pathlib.Path) -> pathlib.Path:
  if not path.exists():
    pytest.skip(f"real data not found at {path} (set GR_JAX_DATA / GR_JAX_REFERENCE to its folder)")
  return path


@pytest.fixture(scope="session")
def cifar100_npz() -> pathlib.Path:
  return _require(DATA_DIR / "cifar100.npz")


@pytest.fixture(scope="session")
def tiny_imagenet_dir() -> pathlib.Path:
  return _require(DATA_DIR / "tiny-imagenet-101")


@pytest.fixture(scope="session")
def lt_fixture() -> pathlib.Path:
  return _require(REFERENCE_DIR / "cifar100_lt_selection.json")
