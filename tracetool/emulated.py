"""Instructions the VMM emulated for its guests (schema.EMULATED_COLUMNS): decoded columns per
stream, and their counts by family. They are not exits (schema.py says why), so no exit reader
sees them; each links by `exit_seq` to the exit during whose handling it was performed.
"""

from __future__ import annotations

from tracetool import schema
from tracetool.record_columns import stream_columns


def emulated_columns(reader) -> dict[tuple[int, int, int], dict]:
    """{(vm, vcpu, epoch): {column: numpy array}} in the order performed."""
    return stream_columns(reader, schema.MSG_EMULATED)


def family_name(code: int) -> str:
    return schema.EMULATED_FAMILIES[code] if code < len(schema.EMULATED_FAMILIES) else f"family {code}"


def instruction_bytes(cols: dict, i: int) -> bytes:
    """The bytes of row `i` (without the zero padding)."""
    return cols["insn"][i].tobytes()[:int(cols["length"][i])]


def by_exit(reader) -> dict[tuple[int, int, int, int], list[str]]:
    """{(vm, vcpu, epoch, exit seq): one text per instruction performed during that exit}."""
    out: dict[tuple[int, int, int, int], list[str]] = {}
    for (vm, vcpu, epoch), cols in emulated_columns(reader).items():
        for i, (seq, address, family) in enumerate(zip(cols["exit_seq"].tolist(), cols["address"].tolist(),
                                                        cols["family"].tolist())):
            text = f"{family_name(family)} {instruction_bytes(cols, i).hex(' ')} at {address:#x}"
            out.setdefault((vm, vcpu, epoch, seq), []).append(text)
    return out


def emulated_counts(reader, where=None) -> dict:
    """{"total": n, "by_family": {"x87": n, …}, "exits": exits that led to them} of the streams
    `where` (a filters.EventFilter: its vm, vcpu and epoch) keeps."""
    import numpy as np

    total, exits, by_family = 0, 0, {}
    for (vm, vcpu, epoch), cols in emulated_columns(reader).items():
        if where is not None and not where.matches_stream(vm, vcpu, epoch):
            continue
        total += len(cols["family"])
        exits += len(np.unique(cols["exit_seq"]))
        codes, counts = np.unique(cols["family"], return_counts=True)
        for code, n in zip(codes.tolist(), counts.tolist()):
            name = family_name(code)
            by_family[name] = by_family.get(name, 0) + n
    return {"total": total, "exits": exits, "by_family": dict(sorted(by_family.items(), key=lambda kv: -kv[1]))}
