"""Shared test fixtures. KVM tests skip without /dev/kvm, except under VMSUP_REQUIRE_KVM=1 (CI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GUEST_DIR = REPO / "guest"
VMSUP = [sys.executable, "-m", "supervisor"]


def kvm_unavailable_reason() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist (no KVM on this machine)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


@pytest.fixture(scope="session")
def kvm_required() -> None:
    reason = kvm_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("VMSUP_REQUIRE_KVM") == "1":
        pytest.fail(f"VMSUP_REQUIRE_KVM=1 but {reason}")
    pytest.skip(reason)


def pytest_collection_modifyitems(config, items):
    # Tests marked `kvm` get the kvm_required fixture: skip (or fail in CI) without /dev/kvm.
    for item in items:
        if item.get_closest_marker("kvm"):
            item.fixturenames.insert(0, "kvm_required")


def pytest_configure(config):
    config.addinivalue_line("markers", "kvm: needs a usable /dev/kvm (fails instead of skipping under VMSUP_REQUIRE_KVM=1)")


@pytest.fixture(autouse=True)
def _private_runtime_and_traces(tmp_path_factory, monkeypatch):
    """Each test's launches keep their default traces and run dirs out of the checkout and of
    other runs: a private VMSUP_TRACE_DIR and XDG_RUNTIME_DIR per test."""
    base = tmp_path_factory.mktemp("vmsup-env")
    runtime = base / "xdg"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("VMSUP_TRACE_DIR", str(base / "traces"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))


def run_vmsup(*args: str, input: bytes | None = None, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `vmsup` CLI in a subprocess; stdout and stderr as text."""
    return subprocess.run([*VMSUP, *args], input=input if input is not None else b"", capture_output=True,
                          timeout=timeout, cwd=REPO, env=env)


@pytest.fixture
def vmsup():
    def _run(*args: str, input: bytes | None = None, timeout: float = 60, env: dict | None = None):
        proc = run_vmsup(*args, input=input, timeout=timeout, env=env)
        proc.stdout = proc.stdout.decode(errors="replace")
        proc.stderr = proc.stderr.decode(errors="replace")
        return proc
    return _run
