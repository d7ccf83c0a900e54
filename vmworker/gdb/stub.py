"""One gdb connection: RSP packets in, replies out, against a `control.Debugger`.

Packets follow the GDB manual's "Packets", "General Query Packets" and "Stop Reply Packets".
What is not understood gets the empty reply (gdb then knows it is unsupported) and a debug log
line; a packet that fails gets `Exx`. Nothing a client sends ends the worker except `k`/`vKill`.
"""

from __future__ import annotations

import logging
import select
import socket
import threading

from ..errors import VmsupError
from ..status import End
from . import packets as P
from . import regs as R
from .catch import CatchError, parse_io_catch, parse_mmio_catch
from .recent_exits import DEFAULT_EXITS, MAX_EXITS, recent_exit_lines
from .control import SIGINT, SIGTRAP, BreakpointError, Debugger, Stop
from .target_xml import TARGET_XML
from .watch import WatchError

log = logging.getLogger("vmsup.gdb")

PACKET_SIZE = P.MAX_PACKET
MAX_MEMORY_READ = (PACKET_SIZE - 8) // 2  # hex doubles it
POLL_SECONDS = 0.2  # how often a waiting stub looks whether the VM ended
ERROR_BAD_PACKET, ERROR_MEMORY, ERROR_REGISTER, ERROR_BREAKPOINT, ERROR_THREAD = (
    b"E01", b"E14", b"E02", b"E03", b"E04")


class Disconnected(Exception):
    pass


class Stub:
    """Serves one connected gdb until it detaches, kills the VM or goes away."""

    def __init__(self, sock: socket.socket, debugger: Debugger, vm_ended, describe=lambda: "",
                 record=lambda event, **fields: None) -> None:
        self.sock = sock
        self.dbg = debugger
        self.vm_ended = vm_ended  # () -> exit code of the ended VM, or None while it runs
        self.describe = describe  # () -> text for `monitor info`
        self.record = record  # (event, **fields): a lifecycle record in the trace
        self.reader = P.PacketReader()
        self.ack = True
        self.g_thread = 0  # vCPU index for register and memory packets
        self.events: list = []
        self.killed = False
        self.resuming_done = threading.Event()  # clear while the VM runs for gdb (c, s, vCont)
        self.resuming_done.set()

    # --- the connection -----------------------------------------------------------------------
    def serve(self) -> None:
        self.dbg.attach()
        stop = self.dbg.stop_all(SIGTRAP)
        self.record("gdb-stop", vcpu=stop.vcpu, signal=stop.signal, why="attach")
        self.g_thread = stop.vcpu
        self.last_stop = stop
        try:
            while True:
                kind, data = self._next_event()
                if kind == "interrupt":
                    continue  # already stopped
                if kind == "bad":
                    self._send_raw(b"-")
                    continue
                if kind != "packet":
                    continue
                if self.ack:
                    self._send_raw(b"+")
                reply = self.handle(data)
                if reply is not None:
                    self.send(reply)
                if self.killed:
                    return
                if data == b"D" or data.startswith(b"D;"):
                    return
        except (Disconnected, OSError) as e:
            log.info("gdb went away without detaching (%s); the VM runs on", e or "connection closed")
            self.record("gdb-gone", detail="gdb disconnected without detaching; the VM runs on")
        finally:
            if not self.killed:
                self.dbg.detach()

    def _next_event(self, timeout: float | None = None):
        while not self.events:
            if timeout is not None:
                ready, _, _ = select.select([self.sock], [], [], timeout)
                if not ready:
                    return ("timeout", None)
            chunk = self.sock.recv(4096)
            if not chunk:
                raise Disconnected("")
            self.events += self.reader.feed(chunk)
        return self.events.pop(0)

    def _send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, data: bytes) -> None:
        self._send_raw(P.frame(data))
        # Acks from gdb are read (and ignored) with the next packet: on a reliable stream a `-`
        # would only follow a corrupted reply, which TCP does not produce.

    # --- dispatch -------------------------------------------------------------------------------
    def handle(self, data: bytes) -> bytes | None:
        try:
            return self._dispatch(data)
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            log.debug("gdb: malformed packet %r: %s", data[:80], e)
            return ERROR_BAD_PACKET
        except VmsupError as e:  # KVM refused (e.g. a register value it will not take)
            log.debug("gdb: packet %r failed: %s", data[:80], e)
            return ERROR_REGISTER if data[:1] in b"GP" else ERROR_BAD_PACKET

    def _dispatch(self, data: bytes) -> bytes | None:
        if not data:
            return b""
        head = data[:1]
        body = data[1:]
        ended = self.vm_ended()
        if ended is not None and head in b"cCsSv" and not data.startswith((b"vMustReplyEmpty", b"vCont?")):
            return b"W%02x" % (ended & 0xFF)
        if head == b"?":
            return self._stop_reply(self.last_stop)
        if head == b"g":
            return self._read_registers()
        if head == b"G":
            return self._write_registers(bytes.fromhex(body.decode()))
        if head == b"p":
            return self._read_register(int(body, 16))
        if head == b"P":
            num, _, value = body.partition(b"=")
            return self._write_register(int(num, 16), bytes.fromhex(value.decode()))
        if head == b"m":
            addr, length = (int(x, 16) for x in body.split(b","))
            return self._read_memory(addr, length)
        if head == b"M":
            where, _, hexdata = body.partition(b":")
            addr, length = (int(x, 16) for x in where.split(b","))
            payload = bytes.fromhex(hexdata.decode())
            if len(payload) != length:
                return ERROR_BAD_PACKET
            return b"OK" if self.dbg.write_memory(self.g_thread, addr, payload) else ERROR_MEMORY
        if head == b"X":
            where, _, raw = body.partition(b":")
            addr, length = (int(x, 16) for x in where.split(b","))
            payload = P.unescape(raw)
            if len(payload) != length:
                return ERROR_BAD_PACKET
            return b"OK" if self.dbg.write_memory(self.g_thread, addr, payload) else ERROR_MEMORY
        if head in (b"c", b"C"):
            return self._resume(None)
        if head in (b"s", b"S"):
            return self._resume(self.g_thread)
        if head == b"b":
            return self._reverse(data)
        if head in (b"Z", b"z"):
            return self._breakpoint(head == b"Z", body)
        if head == b"H":
            return self._set_thread(body)
        if head == b"T":
            index = self._thread_index(body)
            return b"OK" if index is not None and not self.dbg.vcpu_ended(index) else ERROR_THREAD
        if head == b"D":
            self.dbg.detach()
            self.record("gdb-detach")
            log.info("gdb detached; the VM runs on")
            return b"OK"
        if head == b"k":
            self._kill()
            return None
        if head == b"q":
            return self._query(data)
        if head == b"Q":
            if data == b"QStartNoAckMode":
                self.send(b"OK")
                self.ack = False
                return None
            return b""
        if head == b"v":
            return self._v_packet(data)
        log.debug("gdb: unsupported packet %r", data[:80])
        return b""

    # --- packets ------------------------------------------------------------------------------
    def _stop_reply(self, stop: Stop) -> bytes:
        reply = b"T%02xthread:%x;" % (stop.signal, stop.vcpu + 1)
        if stop.watch is not None:
            reply += b"watch:%x;" % stop.watch
        elif stop.why:  # "swbreak"/"hwbreak" carry no value; "replaylog:begin"/":end" do
            reply += stop.why.encode() + (b";" if ":" in stop.why else b":;")
        return reply

    def _read_registers(self) -> bytes:
        regs, sregs = self.dbg.registers(self.g_thread)
        return R.encode_all(regs, sregs, self.dbg.xsave_image(self.g_thread)).hex().encode()

    def _write_registers(self, raw: bytes) -> bytes:
        if len(raw) != R.G_PACKET_BYTES:
            return ERROR_BAD_PACKET
        regs, sregs = self.dbg.registers(self.g_thread)
        fx = self.dbg.xsave_image(self.g_thread)
        changed = set()
        at = 0
        try:
            for i, reg in enumerate(R.REGISTERS):
                size = reg.bits // 8
                changed.add(R.set_value(i, raw[at:at + size], regs, sregs, fx))
                at += size
        except R.RegisterError as e:
            log.debug("gdb: G refused: %s", e)
            return ERROR_REGISTER
        self._set_registers(changed, regs, sregs, fx)
        return b"OK"

    def _read_register(self, num: int) -> bytes:
        if not 0 <= num < len(R.REGISTERS):
            return ERROR_REGISTER
        regs, sregs = self.dbg.registers(self.g_thread)
        fx = self.dbg.xsave_image(self.g_thread) if R.REGISTERS[num].kvm.startswith("fx.") else None
        return R.encode(num, regs, sregs, fx).hex().encode()

    def _write_register(self, num: int, raw: bytes) -> bytes:
        if not 0 <= num < len(R.REGISTERS):
            return ERROR_REGISTER
        regs, sregs = self.dbg.registers(self.g_thread)
        fx = self.dbg.xsave_image(self.g_thread) if R.REGISTERS[num].kvm.startswith("fx.") else None
        try:
            changed = R.set_value(num, raw, regs, sregs, fx)
        except R.RegisterError as e:
            log.debug("gdb: P refused: %s", e)
            return ERROR_REGISTER
        self._set_registers({changed}, regs, sregs, fx)
        return b"OK"

    def _set_registers(self, changed: set[str], regs, sregs, fx) -> None:
        """Hand back to KVM what a register write changed (regs.set_value's answers)."""
        self.dbg.set_registers(self.g_thread, regs if "regs" in changed else None,
                               sregs if "sregs" in changed else None)
        if "fx" in changed:
            self.dbg.set_xsave_image(self.g_thread, fx)

    def _read_memory(self, addr: int, length: int) -> bytes:
        data = self.dbg.read_memory(self.g_thread, addr, min(length, MAX_MEMORY_READ))
        if not data and length:
            return ERROR_MEMORY
        return data.hex().encode()

    def _breakpoint(self, insert: bool, body: bytes) -> bytes:
        kind_s, addr_s, length_s = body.split(b",", 2)
        addr = int(addr_s, 16)
        if kind_s == b"2":  # a write watchpoint (watch.py); length is in bytes
            length = int(length_s.split(b";")[0], 16)
            try:
                if insert:
                    self.dbg.insert_watch(addr, length, self.g_thread)
                else:
                    self.dbg.watches.remove(addr, length)
            except WatchError as e:
                log.debug("gdb: watchpoint at %#x refused: %s", addr, e)
                return ERROR_BREAKPOINT
            return b"OK"
        kind = {b"0": "sw", b"1": "hw"}.get(kind_s)
        if kind is None:
            return b""  # read/access watchpoints (Z3, Z4): guest reads never exit on this host
        try:
            if insert:
                self.dbg.insert(kind, addr, self.g_thread)
            else:
                self.dbg.remove(kind, addr)
        except BreakpointError as e:
            log.debug("gdb: breakpoint at %#x refused: %s", addr, e)
            return ERROR_BREAKPOINT
        return b"OK"

    def _thread_index(self, text: bytes) -> int | None:
        tid = int(text, 16) if text not in (b"-1", b"") else 0
        if tid <= 0:  # 0 = any thread, -1 = all
            return self.last_stop.vcpu
        index = tid - 1
        return index if index < len(self.dbg.vcpus) else None

    def _set_thread(self, body: bytes) -> bytes:
        op, rest = body[:1], body[1:]
        index = self._thread_index(rest)
        if index is None:
            return ERROR_THREAD
        if op == b"g":
            self.g_thread = index
        return b"OK"  # Hc: resumption follows vCont's own thread ids (or the stop's thread)

    def _query(self, data: bytes) -> bytes:
        if data.startswith(b"qSupported"):
            reverse = b";ReverseStep+;ReverseContinue+" if self.dbg.travel is not None else b""
            return (b"PacketSize=%x;qXfer:features:read+;swbreak+;hwbreak+;vContSupported+;QStartNoAckMode+%s"
                    % (PACKET_SIZE, reverse))
        if data.startswith(b"qXfer:features:read:"):
            annex, _, span = data[len(b"qXfer:features:read:"):].partition(b":")
            if annex != b"target.xml":
                return b"E00"
            offset, length = (int(x, 16) for x in span.split(b","))
            chunk = TARGET_XML[offset:offset + min(length, PACKET_SIZE - 16)]
            return (b"l" if offset + len(chunk) >= len(TARGET_XML) else b"m") + chunk
        if data == b"qfThreadInfo":
            live = [i for i in range(len(self.dbg.vcpus)) if not self.dbg.vcpu_ended(i)] or [0]
            return b"m" + b",".join(b"%x" % (i + 1) for i in live)
        if data == b"qsThreadInfo":
            return b"l"
        if data == b"qC":
            return b"QC%x" % (self.last_stop.vcpu + 1)
        if data.startswith(b"qAttached"):
            return b"1"  # gdb's `quit` detaches and the VM runs on
        if data.startswith(b"qThreadExtraInfo,"):
            index = self._thread_index(data.split(b",", 1)[1])
            if index is None:
                return ERROR_THREAD
            state = "ended" if self.dbg.vcpu_ended(index) else "stopped"
            return f"vcpu {index} ({state})".encode().hex().encode()
        if data.startswith(b"qRcmd,"):
            return self._monitor(bytes.fromhex(data[len(b"qRcmd,"):].decode()).decode(errors="replace"))
        log.debug("gdb: unsupported query %r", data[:80])
        return b""

    def _v_packet(self, data: bytes) -> bytes | None:
        if data == b"vMustReplyEmpty":
            return b""
        if data == b"vCont?":
            return b"vCont;c;C;s;S"
        if data.startswith(b"vCont;"):
            step = None
            for action in data[len(b"vCont;"):].split(b";"):
                verb, _, thread = action.partition(b":")
                if verb[:1] in (b"s", b"S"):
                    index = self._thread_index(thread) if thread else self.g_thread
                    if index is None:
                        return ERROR_THREAD
                    step = index if step is None else step
                elif verb[:1] not in (b"c", b"C"):
                    return ERROR_BAD_PACKET
            return self._resume(step)
        if data.startswith(b"vKill"):
            self._kill()
            return b"OK"
        log.debug("gdb: unsupported packet %r", data[:80])
        return b""

    def _monitor(self, command: str) -> bytes:
        words = command.split()
        if not words or words[0] == "help":
            text = ("vmsup monitor commands:\n  help   this list\n  info   the VM's name, vCPUs and state\n"
                    "  exits [N]      this VM's last N exits (default 10), with guest addresses\n"
                    "  catch io PORT[-PORT] [in|out]   stop at port I/O exits there\n"
                    "  catch mmio ADDR[-ADDR]          stop at MMIO exits there (guest-physical)\n"
                    "  catch          the catches set\n  catch off      remove every catch\n")
        elif words[0] == "info":
            text = self.describe() + "\n"
        elif words[0] == "catch":
            text = self._catch(words[1:])
        elif words[0] == "exits":
            text = self._exits(words[1:])
        else:
            text = f"unknown monitor command {words[0]!r}; try 'monitor help'\n"
        self.send(b"O" + text.encode().hex().encode())
        return b"OK"

    def _exits(self, words: list[str]) -> str:
        try:
            n = int(words[0], 0) if words else DEFAULT_EXITS
            if len(words) > 1 or not 0 < n <= MAX_EXITS:
                raise ValueError
        except ValueError:
            return f"usage: monitor exits [N], N from 1 to {MAX_EXITS}\n"
        batchers = getattr(self.dbg.machine, "batchers", None) or []
        if not any(b is not None for b in batchers):
            return "this VM's exits are not recorded (no trace): none kept\n"
        return "".join(line + "\n" for line in recent_exit_lines(batchers, n)) or "no exits yet\n"

    def _catch(self, words: list[str]) -> str:
        catches, mmio = self.dbg.io_catches, self.dbg.mmio_catches
        if not words:
            return "".join(f"catch {c.describe()}\n" for c in (*catches.specs, *mmio.specs)) or "no catches\n"
        if words == ["off"]:
            catches.clear()
            mmio.clear()
            return "every catch removed\n"
        if words[0] not in ("io", "mmio"):
            return "usage: monitor catch io PORT[-PORT] [in|out] | monitor catch mmio ADDR[-ADDR] | monitor catch off\n"
        try:
            if words[0] == "mmio":
                spec = parse_mmio_catch(words[1:])
                mmio.add(spec)
                return f"catch {spec.describe()}: the guest stops at each such exit\n"
            spec = parse_io_catch(words[1:])
        except CatchError as e:
            return f"{e}\n"
        catches.add(spec)
        return f"catch {spec.describe()}: the guest stops at each such exit\n"

    # --- running ------------------------------------------------------------------------------
    def _resume(self, step: int | None) -> None:
        """Continue (or step one vCPU), wait for the next stop, a Ctrl-C or the VM's end, and say which."""
        self.record("gdb-step" if step is not None else "gdb-continue", vcpu=step if step is not None else -1)
        self.dbg.resume(step)
        self.resuming_done.clear()
        try:
            self.send(self._wait_for_stop())
        finally:
            self.resuming_done.set()

    def _wait_for_stop(self) -> bytes:
        while True:
            ended = self.vm_ended()
            if ended is not None:
                return b"W%02x" % (ended & 0xFF)
            ready, _, _ = select.select([self.sock, self.dbg.wake_fd], [], [], POLL_SECONDS)
            if self.dbg.wake_fd in ready or not ready:
                stop = self.dbg.take_stop()
                for note in self.dbg.take_notes():  # console output (`O`) before the stop reply
                    self.send(b"O" + (note + "\n").encode().hex().encode())
                if stop is not None:
                    self.record("gdb-stop", vcpu=stop.vcpu, signal=stop.signal, why=stop.why)
                    self.last_stop = stop
                    self.g_thread = stop.vcpu
                    return self._stop_reply(stop)
            if self.sock in ready:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise Disconnected("")
                for kind, data in self.reader.feed(chunk):
                    if kind == "interrupt":
                        self.dbg.stop_all(SIGINT, self.g_thread)
                    elif kind == "packet":
                        self.events.append((kind, data))  # answered once stopped

    def _reverse(self, data: bytes) -> bytes | None:
        """`bs` (reverse-stepi) and `bc` (reverse-continue), GDB manual "Packets": served by a rerun's
        time travel; elsewhere, or with anything after the letter, an error reply."""
        kind = {b"bs": "step", b"bc": "continue"}.get(data)
        if kind is None or self.dbg.travel is None:
            log.debug("gdb: reverse packet %r refused", data[:80])
            return ERROR_BAD_PACKET
        self.record("gdb-reverse-" + kind, vcpu=self.g_thread)
        self.dbg.resume_reverse(kind)
        self.resuming_done.clear()
        try:
            self.send(self._wait_for_stop())
        finally:
            self.resuming_done.set()
        return None

    def _kill(self) -> None:
        self.killed = True
        self.dbg.machine.stop(End.GDB_KILL, detail="killed from gdb")
        log.info("gdb killed the VM")
