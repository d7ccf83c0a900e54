"""The filter language: parsing, one-line errors naming the bad term, and vectorised masks."""

from __future__ import annotations

import numpy as np
import pytest

from tracetool import schema
from tracetool.filters import EventFilter, FilterError, parse_filter

IO, MMIO, HLT = schema.REASON_IO, schema.REASON_MMIO, schema.REASON_HLT


def batch(rows: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """Columns for (reason, addr) rows; the other schema columns are zeros."""
    n = len(rows)
    cols = {name: np.zeros(n, schema.COLUMN_DTYPES[name]) for name in schema.COLUMN_NAMES}
    cols["reason"] = np.array([r for r, _ in rows], schema.COLUMN_DTYPES["reason"])
    cols["addr"] = np.array([a for _, a in rows], schema.COLUMN_DTYPES["addr"])
    return cols


ROWS = batch([(IO, 0x10), (IO, 0x3F8), (MMIO, 0xD0000000), (HLT, 0), (MMIO, 0x10), (IO, 0xF4)])


def test_terms_with_different_keys_and_alternatives_or():
    f = parse_filter("vm=0|2, reason=io|mmio")
    assert f.vm == (0, 2) and f.reason == (IO, MMIO)
    assert f.mask(ROWS, vm=0).tolist() == [True, True, True, False, True, True]
    assert f.mask(ROWS, vm=1).tolist() == [False] * 6


def test_port_implies_io_and_addr_implies_mmio():
    # 0x10 is both an I/O port and (in row 4) an MMIO address: port= must only match the io one.
    assert parse_filter("port=0x10").mask(ROWS).tolist() == [True, False, False, False, False, False]
    assert parse_filter("addr=16").mask(ROWS).tolist() == [False, False, False, False, True, False]
    assert parse_filter("port=0x3f8|0xf4").mask(ROWS).tolist() == [False, True, False, False, False, True]
    assert parse_filter("reason=io|hlt,port=0x10").mask(ROWS).tolist() == [True] + [False] * 5


def test_reasons_by_name_or_number_and_numbers_in_hex_or_decimal():
    assert parse_filter("reason=HLT").reason == (HLT,)
    assert parse_filter("reason=5").reason == (HLT,)
    assert parse_filter("reason=0x6|io").reason == (IO, MMIO)
    assert parse_filter("vcpu=0x1F").vcpu == (31,)
    assert parse_filter("addr=0xd0000000").addr == (0xD0000000,)


def test_empty_filter_matches_everything():
    for text in ("", "  ", None):
        f = parse_filter(text)
        assert f.matches_everything and f.mask(ROWS).all()


def test_stream_keys_match_scalars_or_columns():
    f = parse_filter("vm=1,vcpu=2|3,epoch=0")
    cols = dict(ROWS, vm=np.array([1, 1, 0, 1, 1, 1], np.uint32), vcpu=np.array([2, 3, 2, 4, 2, 3], np.uint32),
                epoch=np.zeros(6, np.uint32))
    assert f.mask(cols).tolist() == [True, True, False, False, True, True]
    assert f.mask(ROWS, vm=1, vcpu=3, epoch=0).all()
    assert not f.mask(ROWS, vm=1, vcpu=4, epoch=0).any()
    assert f.matches_stream(1, 2, 0) and not f.matches_stream(0, 2, 0)
    with pytest.raises(ValueError, match="no vm value or column"):
        f.mask(ROWS)


def test_values_outside_a_columns_range_never_match():
    cols = dict(ROWS, vm=np.zeros(6, np.uint32))
    assert not EventFilter(vm=(1 << 40,)).mask(cols).any()
    assert EventFilter(vm=(0, 1 << 40)).mask(cols).all()


@pytest.mark.parametrize("text, term, words", [
    ("cpu=1", "'cpu=1'", "unknown key 'cpu'"),
    ("vm", "'vm'", "expected key=value"),
    ("vm=one", "'vm=one'", "'one' is not a number"),
    ("vm=-1", "'vm=-1'", "'-1' is not a number"),
    ("port=0xzz", "'port=0xzz'", "'0xzz' is not a number"),
    ("vm=0,reason=iox", "'reason=iox'", "unknown reason 'iox'"),
    ("reason=256", "'reason=256'", "out of range"),
    ("port=0x10000", "'port=0x10000'", "out of range"),
    ("vm=1|", "'vm=1|'", "empty value"),
    ("vm=1,,reason=io", "'vm=1,,reason=io'", "empty term"),
    ("vm=1,vm=2", "'vm=2'", "vm given twice"),
    ("port=0x10,addr=0x1000", "port=", "no event is both"),
    ("reason=hlt,port=0x10", "port=", "reason= excludes io"),
    ("reason=io,addr=0x1000", "addr=", "reason= excludes mmio"),
])
def test_bad_filters_fail_with_one_line_naming_the_term(text, term, words):
    with pytest.raises(FilterError) as info:
        parse_filter(text)
    message = str(info.value)
    assert term in message and words in message and "\n" not in message


def test_from_options_takes_ints_strings_and_lists():
    f = EventFilter.from_options(vm=0, vcpu="1|2", reason=["io", "mmio"], port=None)
    assert (f.vm, f.vcpu, f.reason, f.port) == ((0,), (1, 2), (IO, MMIO), None)
    assert EventFilter.from_options(port="0x10").reasons == (IO,)
    with pytest.raises(FilterError, match="unknown reason 'bogus'"):
        EventFilter.from_options(reason="bogus")
    with pytest.raises(TypeError):
        EventFilter.from_options(cpu=1)


def test_combining_filters_keeps_what_both_allow():
    f = parse_filter("vm=0|1|2") & EventFilter.from_options(vm="1|2|3", reason="io")
    assert f.vm == (1, 2) and f.reason == (IO,)
    with pytest.raises(FilterError, match="excludes io"):
        parse_filter("reason=hlt") & parse_filter("port=0x10")


def test_canonical_text_parses_back_to_the_same_filter():
    f = parse_filter("reason=mmio|io , vm=3|1,addr=4096")
    assert str(f) == "vm=1|3,reason=io|mmio,addr=0x1000"
    assert parse_filter(str(f)) == f


def test_masks_are_vectorised_over_large_batches():
    n = 1_000_000
    rng = np.random.default_rng(0)
    cols = {"reason": rng.choice(np.array([IO, MMIO, HLT], np.uint8), n),
            "addr": rng.integers(0, 0x20, n, dtype=np.uint64)}
    keep = parse_filter("port=0x10|0x11").mask(cols)
    want = (cols["reason"] == IO) & ((cols["addr"] == 0x10) | (cols["addr"] == 0x11))
    assert keep.dtype == bool and np.array_equal(keep, want)
