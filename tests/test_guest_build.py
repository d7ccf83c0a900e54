"""The committed guest images rebuild byte for byte from guest/*.S.

Runs `make -C guest check` (which rebuilds every guest into a directory of our
choosing and cmp's each file with the committed one), then compares the
rebuilt files here too, so a failure names the guest.  Skips when GNU
binutils or make are missing.
"""

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GUEST = REPO / "guest"
SEED16_BYTES = bytes.fromhex("31c0e71040ebfb")

TOOLS = ("as", "ld", "make", "gcc")  # gcc: mbkernel is C
missing = [tool for tool in TOOLS if shutil.which(tool) is None]
needs_tools = pytest.mark.skipif(
    bool(missing), reason=f"guest build needs GNU {', '.join(missing)} on PATH"
)


def manifest():
    with open(GUEST / "guests.toml", "rb") as f:
        return tomllib.load(f)


def committed_images():
    return sorted(entry["file"] for entry in manifest().values())


def test_seed16_is_the_seeds_guest():
    assert (GUEST / "seed16.bin").read_bytes() == SEED16_BYTES


def test_manifest_lists_existing_images():
    entries = manifest()
    assert "seed16" in entries and entries["seed16"]["mode"] == "real"
    for name, entry in entries.items():
        assert (GUEST / entry["file"]).is_file(), name
        assert entry["format"] in ("flat", "elf", "multiboot"), name
        if entry["format"] == "flat":
            assert entry["mode"] in ("real", "protected", "long"), name
        assert isinstance(entry["vcpus"], int) and entry["vcpus"] >= 1, name
        assert entry["summary"], name


@needs_tools
def test_make_check_reproduces_every_committed_image(tmp_path):
    out = tmp_path / "rebuilt"
    result = subprocess.run(
        ["make", "--no-print-directory", "-C", str(GUEST), "check",
         f"CHECK_DIR={out}"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, (
        f"make check failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    for name in committed_images():
        rebuilt = out / name
        assert rebuilt.is_file(), f"{name} was not rebuilt"
        assert rebuilt.read_bytes() == (GUEST / name).read_bytes(), (
            f"{name} differs from its rebuild"
        )
    assert (out / "seed16.bin").read_bytes() == SEED16_BYTES
