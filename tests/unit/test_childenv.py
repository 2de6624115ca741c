"""Child processes inherit no secrets: only harmless variables and our PYTHONPATH."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import hsmocsp
from hsmocsp.childenv import minimal_env, python_env


def test_minimal_env_keeps_only_harmless_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HSM_PIN", "1234")
    monkeypatch.setenv("VAULT_TOKEN", "s.secret")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    env = minimal_env()
    assert "HSM_PIN" not in env and "VAULT_TOKEN" not in env
    assert env["PATH"] == "/usr/bin:/bin"


def test_pythonpath_finds_this_hsmocsp_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    root = str(Path(hsmocsp.__file__).resolve().parents[1])
    assert python_env({})["PYTHONPATH"] == root
    assert minimal_env()["PYTHONPATH"] == os.pathsep.join((root, "/somewhere/else"))
