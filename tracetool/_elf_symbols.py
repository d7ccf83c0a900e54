"""Reading an ELF file's symbols and DWARF line table with pyelftools, for tracetool.symbols.

Returns plain lists; symbols.SymbolTable turns them into sorted numpy ranges.
"""

from __future__ import annotations

import posixpath

from elftools.common.exceptions import ELFError
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from .symbols import NO_ID, SymbolError, _Candidate

# Among symbols at one address, the lowest rank names it: functions, then objects, then labels;
# global before weak before local (Elf32_Sym st_info: STT_*, STB_*).
_TYPE_RANK = {"STT_FUNC": 0, "STT_OBJECT": 3, "STT_NOTYPE": 6}
_BIND_RANK = {"STB_GLOBAL": 0, "STB_WEAK": 1, "STB_LOCAL": 2}


def read_elf(path: str):
    """(symbol candidates, line rows, lines, warnings) of the ELF at `path`; SymbolError if unreadable."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise SymbolError(path, e.strerror or str(e)) from None
    with f:
        try:
            elf = ELFFile(f)
            candidates = _symbols(elf)
        except (ELFError, ValueError, KeyError, IndexError, EOFError) as e:
            raise SymbolError(path, f"not a readable ELF file ({e})") from None
        except Exception as e:  # pyelftools' parser raises assorted types on malformed headers
            raise SymbolError(path, f"not a readable ELF file ({type(e).__name__}: {e})") from None
        try:
            rows, lines = _line_table(elf)
            warnings = []
        except Exception as e:  # noqa: BLE001 — corrupt DWARF of any kind: keep the symbols, lose lines
            rows, lines = [], []
            warnings = [f"{path}: DWARF line table unreadable ({type(e).__name__}: {e}); showing symbols without source lines"]
    return candidates, rows, lines, warnings


def _symbols(elf: ELFFile) -> list[_Candidate]:
    """Functions, objects and code labels of .symtab with an allocated section; none if stripped."""
    symtab = elf.get_section_by_name(".symtab")
    if not isinstance(symtab, SymbolTableSection):
        return []
    section_ends: dict[int, int] = {}
    for index, sec in enumerate(elf.iter_sections()):
        if sec["sh_flags"] & SH_FLAGS.SHF_ALLOC:
            section_ends[index] = sec["sh_addr"] + sec["sh_size"]
    out = []
    for sym in symtab.iter_symbols():
        kind, shndx = sym["st_info"]["type"], sym["st_shndx"]
        if not sym.name or kind not in _TYPE_RANK or not isinstance(shndx, int) or shndx not in section_ends:
            continue  # file/section symbols, absolute constants, undefined names
        rank = _TYPE_RANK[kind] + _BIND_RANK.get(sym["st_info"]["bind"], 2)
        out.append(_Candidate(sym["st_value"], sym["st_size"], section_ends[shndx], rank, sym.name))
    return out


def _line_table(elf: ELFFile) -> tuple[list[tuple[int, int]], list[tuple[str, int]]]:
    """Rows (address, line id | NO_ID) sorted by address, and the (file, line) of each line id.

    Each DWARF line-program row holds from its address up to the next row's; an end_sequence row
    ends the range with no line. At one address, a sequence's end sorts before another's start and
    otherwise the last row of the program wins, as addr2line reports it.
    """
    if not elf.has_dwarf_info():
        return [], []
    dwarf = elf.get_dwarf_info()
    ids: dict[tuple[str, int], int] = {}
    keyed: list[tuple[int, int, int, int]] = []  # (address, not end, order, id)
    for cu in dwarf.iter_CUs():
        program = dwarf.line_program_for_CU(cu)
        if program is None:
            continue
        names = _file_names(program)
        for entry in program.get_entries():
            state = entry.state
            if state is None:
                continue
            if state.end_sequence:
                keyed.append((state.address, 0, len(keyed), NO_ID))
                continue
            key = (names.get(state.file, f"<file {state.file}>"), state.line)
            keyed.append((state.address, 1, len(keyed), ids.setdefault(key, len(ids))))
    keyed.sort()
    return [(address, line_id) for address, _, _, line_id in keyed], list(ids)


def _file_names(program) -> dict[int, str]:
    """DWARF file number → path as the build recorded it (relative to the build directory, './' dropped)."""
    version = program.header["version"]
    dirs = [d.decode(errors="replace") for d in program["include_directory"]]
    names = {}
    for i, entry in enumerate(program["file_entry"]):
        # DWARF 5 numbers files and directories from 0 (entry 0 = the unit's directory); earlier
        # versions number files from 1 and directory 0 means the compilation directory (DWARF 4 §6.2.4).
        number = i if version >= 5 else i + 1
        d = entry.dir_index
        directory = (dirs[d] if d < len(dirs) else "") if version >= 5 else (dirs[d - 1] if 0 < d <= len(dirs) else "")
        name = entry.name.decode(errors="replace")
        names[number] = posixpath.normpath(posixpath.join(directory, name)) if directory else posixpath.normpath(name)
    return names


def first_load_bytes(path: str) -> bytes | None:
    """The file bytes of the lowest-addressed PT_LOAD segment with file contents; None if unreadable."""
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            loads = [seg for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD" and seg["p_filesz"]]
            return min(loads, key=lambda seg: seg["p_paddr"]).data() if loads else None
    except Exception:  # noqa: BLE001 — any malformed ELF simply does not match
        return None
