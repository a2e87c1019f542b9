"""Shared test fixtures: a synthetic dataset made here, and where the real data lives.

The trainer, protocol, checkpoint and multi-device tests run on ``synthetic_npz``, made by the
tests, so a clone without the real data still tests everything end to end. The real datasets are
never committed; the tests that need them (marked ``real_data``) read them from ``../shared/data``
beside the checkout, or from the directory named by ``GR_JAX_DATA``, and skip with a message naming
the missing path only when it is truly absent.
"""
import os
import pathlib
import tempfile

import jax
import pytest

from tiny_run import write_synthetic_npz

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = pathlib.Path(os.environ.get("GR_JAX_DATA", REPO_ROOT.parent / "shared" / "data"))
REFERENCE_DIR = pathlib.Path(
    os.environ.get("GR_JAX_REFERENCE", REPO_ROOT.parent / "shared" / "reference"))
REAL_DATA_FIXTURES = ("cifar100_npz", "tiny_imagenet_dir", "lt_fixture")

# XLA:CPU generates code with LLVM at optimisation level 1 instead of its default 2: the tests'
# programs are small and run a few steps each, so level 2 costs more compile time than it saves
# (the tiny protocol run compiles in half the time and runs as fast). It changes the machine code,
# not the programs, and every comparison in the tests runs both sides under it. The caller's own
# XLA_FLAGS come after it and win; set before JAX starts its CPU backend, subprocesses inherit it.
os.environ["XLA_FLAGS"] = " ".join(
    ["--xla_backend_optimization_level=1", os.environ.get("XLA_FLAGS", "")]).strip()
# One persistent XLA compilation cache for the session and the subprocesses it starts: the tests
# build many experiments whose programs are the same, and a compiled program loaded from the cache
# is the one compiled before, so results do not change. Set before JAX reads its configuration.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="gr_jax_tests_xla_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# The same for this process, also if a plugin imported JAX before the variables were set.
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_collection_modifyitems(items):
  for item in items:
    if set(REAL_DATA_FIXTURES) & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.real_data)


def _require(path: pathlib.Path) -> pathlib.Path:
  if not path.exists():
    pytest.skip(f"real data not found at {path} (set GR_JAX_DATA / GR_JAX_REFERENCE to its folder)")
  return path


@pytest.fixture(scope="session")
def synthetic_npz(tmp_path_factory) -> pathlib.Path:
  return write_synthetic_npz(tmp_path_factory.mktemp("synthetic") / "synthetic.npz")


@pytest.fixture(scope="session")
def cifar100_npz() -> pathlib.Path:
  return _require(DATA_DIR / "cifar100.npz")


@pytest.fixture(scope="session")
def tiny_imagenet_dir() -> pathlib.Path:
  return _require(DATA_DIR / "tiny-imagenet-101")


@pytest.fixture(scope="session")
def lt_fixture() -> pathlib.Path:
  return _require(REFERENCE_DIR / "cifar100_lt_selection.json")
