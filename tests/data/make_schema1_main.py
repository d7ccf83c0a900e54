"""How tests/data/schema1_main.vmtrace (+ .json, what main's reader read from it) was written: with
the writer of commit 5a26b21 (before tracetool/trace_file.py was split). Kept for the record; the
test reads the committed file, it does not run this.
"""
import json, sys
import numpy as np
from tracetool import schema
from tracetool.trace_file import TraceWriter, TraceReader

out = sys.argv[1]
rng = np.random.default_rng(9)
T0 = 1_000_000_000_000
with TraceWriter(out, {"run_id": "fixture", "argv": ["vmsup", "launch", "seed16"]}, block_events=64, overwrite=True) as w:
    w.write_record(schema.MSG_VM_START, {"v": 1, "type": "vm-start", "vm": 0, "epoch": 0, "name": "seed16", "t": T0 - 1000})
    for b in range(3):
        n = 50
        i = np.arange(b * n, (b + 1) * n)
        cols = {"t_exit": T0 + i * 12_000 + rng.integers(0, 500, n), "guest_ns": rng.integers(3000, 4000, n),
                "addr": np.full(n, 0x10), "data": i, "count": np.ones(n, int), "reason": np.full(n, schema.REASON_IO),
                "size": np.full(n, 2), "flags": np.full(n, schema.FLAG_WRITE)}
        cols["reason"][::7] = schema.REASON_HLT
        cols["count"][5] = 3
        w.write_exits(0, 0, 0, b * n, n, cols, payloads={5: b"abcdef"})
    # a record-time filtered batch on vcpu 1: 20 of 40 events kept
    keep = np.arange(0, 40, 2)
    cols = {"t_exit": T0 + keep * 20_000, "guest_ns": np.full(20, 5000), "addr": np.full(20, 0xD0000000),
            "data": keep * 3, "count": np.ones(20, int), "reason": np.full(20, schema.REASON_MMIO),
            "size": np.full(20, 4), "flags": keep % 4 == 0}
    w.write_exits(0, 1, 0, 0, 40, cols, seq=keep.astype(np.uint64))
    w.write_record(schema.MSG_GAP, {"v": 1, "type": "gap", "vm": 0, "vcpu": 1, "epoch": 0, "first_missing": 40, "count": 10, "cause": "fixture"})
    w.write_record(schema.MSG_LIFECYCLE, {"v": 1, "type": "lifecycle", "vm": 0, "epoch": 0, "event": "spawn", "t": T0})
    w.write_record(schema.MSG_VM_END, {"v": 1, "type": "vm-end", "vm": 0, "epoch": 0, "status": "max-exits", "final_seq": [150, 50], "t": T0 + 10**7})

with TraceReader(out) as r:
    assert r.closed_cleanly and not r.unexplained_gaps
    ex = r.exits()
    expected = {"events": {k: v.tolist() for k, v in ex.items()}, "records": r.records(),
                "payloads": [[list(k), v.hex()] for k, v in sorted(r.payloads().items())],
                "streams": [[s.vm, s.vcpu, s.epoch, s.events, s.covered] for s in r.streams()]}
json.dump(expected, open(out.replace(".vmtrace", ".json"), "w"), separators=(",", ":"), sort_keys=True)
