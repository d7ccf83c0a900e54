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
        assert entry["format"] in ("flat", "elf", "multiboot", "bzimage"), name
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


def flat_guest_names():
    """Guests shipped as flat bytes (format flat, or a multiboot a.out-kludge .bin)."""
    return sorted(Path(entry["file"]).stem for entry in manifest().values() if entry["file"].endswith(".bin"))


def test_every_flat_guest_keeps_its_elf_with_symbols_beside_the_bin():
    from elftools.elf.elffile import ELFFile

    for name in flat_guest_names():
        elf_path = GUEST / f"{name}.elf"
        assert elf_path.is_file(), f"{name}.bin has no {name}.elf beside it"
        with open(elf_path, "rb") as f:
            elf = ELFFile(f)
            assert elf.get_section_by_name(".symtab") is not None, f"{name}.elf is stripped"
            assert elf.has_dwarf_info(), f"{name}.elf has no debug info"
            # The .bin is the ELF's loadable bytes (objcopy -O binary): one segment, same bytes.
            loads = [seg for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD" and seg["p_filesz"]]
            first = min(loads, key=lambda seg: seg["p_paddr"])
            assert (GUEST / f"{name}.bin").read_bytes().startswith(first.data()), name


def test_elf_guests_keep_symbols_and_debug_info():
    from elftools.elf.elffile import ELFFile

    for entry in manifest().values():
        if entry["file"].endswith(".elf"):
            with open(GUEST / entry["file"], "rb") as f:
                elf = ELFFile(f)
                assert elf.get_section_by_name(".symtab") is not None, entry["file"]
                assert elf.has_dwarf_info(), entry["file"]


@needs_tools
def test_guests_rebuild_identically_from_another_directory(tmp_path):
    # Debug info must not record where the checkout lives: build a copy elsewhere.
    elsewhere = tmp_path / "some" / "other" / "checkout" / "guest"
    shutil.copytree(GUEST, elsewhere, ignore=shutil.ignore_patterns("build"))
    result = subprocess.run(
        ["make", "--no-print-directory", "-C", str(elsewhere), "check", f"CHECK_DIR={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"make check from a copy failed:\n{result.stdout}\n{result.stderr}"
    for name in committed_images() + [f"{n}.elf" for n in flat_guest_names()]:
        assert (tmp_path / "out" / name).read_bytes() == (GUEST / name).read_bytes(), name
