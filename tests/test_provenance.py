"""Which commit a result records: the environment's, our own checkout's, never another repo's."""

import importlib.util
import shutil
import subprocess

import jax
import pytest

from gr_jax import provenance

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _load_copy(path):
  spec = importlib.util.spec_from_file_location("provenance_copy", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_environment_names_the_commit_of_a_copied_tree(monkeypatch):
  monkeypatch.setenv(provenance.COMMIT_ENV, "abc1234")
  assert provenance.commit() == "abc1234"
  assert provenance.provenance()["commit"] == "abc1234"


@needs_git
def test_our_checkout_is_described_by_git(monkeypatch):
  monkeypatch.delenv(provenance.COMMIT_ENV, raising=False)
  head = subprocess.run(["git", "-C", provenance._SOURCE_TREE, "rev-parse", "--short=7", "HEAD"],
                        capture_output=True, text=True)
  if head.returncode:
    assert provenance.commit() == "unknown"
  else:
    assert provenance.commit().startswith(head.stdout.strip())


@needs_git
def test_a_package_outside_its_checkout_or_inside_another_repo_is_unknown(tmp_path, monkeypatch):
  monkeypatch.delenv(provenance.COMMIT_ENV, raising=False)
  loose = tmp_path / "site" / "gr_jax" / "provenance.py"
  loose.parent.mkdir(parents=True)
  shutil.copy(provenance.__file__, loose)
  assert _load_copy(loose).commit() == "unknown"

  other = tmp_path / "other_repo"
  nested = other / "venv" / "gr_jax" / "provenance.py"
  nested.parent.mkdir(parents=True)
  shutil.copy(provenance.__file__, nested)
  subprocess.run(["git", "init", "-q", str(other)], check=True)
  subprocess.run(["git", "-C", str(other), "-c", "user.name=t", "-c", "user.email=t@t",
                  "commit", "-q", "--allow-empty", "-m", "x"], check=True)
  assert _load_copy(nested).commit() == "unknown"


def test_versions_and_device_kinds_are_recorded():
  record = provenance.provenance(jax.devices())
  assert record["packages"]["jax"] == jax.__version__
  assert record["packages"]["optax"]
  assert record["device_kinds"] == sorted({d.device_kind for d in jax.devices()})


def test_xla_flags_are_recorded(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=true")
  assert provenance.provenance()["xla_flags"] == "--xla_gpu_deterministic_ops=true"
  monkeypatch.delenv("XLA_FLAGS")
  assert provenance.provenance()["xla_flags"] is None
