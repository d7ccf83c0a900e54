"""The end statuses are defined once (vmworker.status.End): the README's table and the sources
are held against it."""

from __future__ import annotations

import re
from pathlib import Path

from vmworker.status import EXIT_OK, EXIT_VM_ERROR, End, exit_code_for

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("vmworker", "supervisor", "tracetool")
_STATUS_NAME = re.compile(r"`([a-z]+(?:-[a-z]+)*)`")


def readme_status_codes() -> dict[str, set[int]]:
    """{status: exit codes} from README.md's "How a VM ends, and exit codes" table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### How a VM ends, and exit codes", 1)[1]
    codes: dict[str, set[int]] = {}
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows, "the README's status table is missing"
    for line in rows[2:]:  # past the header and the |---| line
        status_cell, _meaning, code_cell = [c.strip() for c in line.strip("|").split("|")]
        names = _STATUS_NAME.findall(status_cell)
        numbers = [int(n) for n in re.findall(r"\d+", code_cell)]
        if " / " in status_cell and " / " in code_cell:  # `a` / `b` | 1 / 2: pairwise
            assert len(names) == len(numbers), line
            pairs = [(n, {c}) for n, c in zip(names, numbers)]
        else:
            pairs = [(n, set(numbers)) for n in names]
        for name, found in pairs:
            codes.setdefault(name, set()).update(found)
    return codes


def test_readme_status_table_matches_the_end_enum():
    readme = readme_status_codes()
    enum = {end.value: set(end.codes) for end in End}
    assert set(readme) == set(enum), "statuses in the README but not in End, or the other way"
    for name, codes in enum.items():
        assert readme[name] == codes, f"{name}: README says {sorted(readme[name])}, End says {sorted(codes)}"


def test_end_members_are_their_wire_strings_and_map_to_exit_codes():
    assert End.MAX_EXITS == "max-exits" and f"{End.GUEST_EXIT}" == "guest-exit"
    assert End("worker-died") is End.WORKER_DIED
    assert exit_code_for("guest-exit", 0) == EXIT_OK and exit_code_for("guest-exit", 3) == 1
    assert exit_code_for("shutdown") == 3 and exit_code_for("no-such-status") == EXIT_VM_ERROR
    assert all(end.meaning for end in End)


# A status spelled as a literal: any quoted string of a status with a hyphen (no other string looks
# like one), or a one-word status where a status goes (a stop, a StopVm, status=..., a compare
# with a result's status).
_HYPHENATED = sorted(end.value for end in End if "-" in end.value)
_ONE_WORD = sorted(end.value for end in End if "-" not in end.value)
_WORD = "|".join(map(re.escape, _ONE_WORD))
_LITERAL_STATUS = re.compile(
    r"""["'](?:%s)["']""" % "|".join(map(re.escape, _HYPHENATED))
    + r"""|(?:\.stop|StopVm)\(\s*["'](?:%s)["']""" % _WORD
    + r"""|\bstatus["']?\]?\s*(?:=|==|!=|:)\s*["'](?:%s)["']""" % _WORD
    + r"""|\bstatus["']\)\s*(?:==|!=)\s*["'](?:%s)["']""" % _WORD
    + r"""|\bwhat\s*(?:==|!=)\s*["'](?:%s)["']""" % _WORD
)


def test_no_end_status_is_spelled_as_a_string_literal_outside_the_enum():
    offenders = []
    for package in SOURCES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "vmworker" / "status.py":
                continue
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if _LITERAL_STATUS.search(code):
                    offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not offenders, "use vmworker.status.End instead of:\n" + "\n".join(offenders)


def test_the_literal_check_sees_the_spellings_it_forbids():
    for bad in ('ctx.stop("max-exits")', "raise StopVm('reset')", 'result["status"] = "stopped"',
                'if result.get("status") == "error":', 'self._record(slot, "stop", status="fatal")'):
        assert _LITERAL_STATUS.search(bad), bad
    for fine in ('slot.state = "stopped"', 'done_key = "stopped"', '"--max-exits"', '{"error": text}'):
        assert not _LITERAL_STATUS.search(fine), fine
