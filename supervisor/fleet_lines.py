"""Line numbers in a fleet file, which tomllib does not give: where each table header and each
`key =` sits, so that every problem with a fleet file can be `FILE:LINE: message`.
"""

from __future__ import annotations

import re

_HEADER = re.compile(r"""^\s*(\[\[?)\s*([^\]]*?)\s*\]\]?\s*(?:#.*)?$""")


def _unquote(part: str) -> str:
    part = part.strip()
    return part[1:-1] if len(part) >= 2 and part[0] == part[-1] and part[0] in "\"'" else part


class FleetLines:
    """Line numbers for a parsed fleet file, which tomllib does not give: found by scanning the text
    for table headers and `key =` lines (a heuristic that covers every way the format is written)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        # (line number, "[" or "[[", dotted name as a tuple)
        self.headers: list[tuple[int, str, tuple[str, ...]]] = []
        for n, line in enumerate(self.lines, 1):
            m = _HEADER.match(line)
            if m:
                self.headers.append((n, m.group(1), tuple(_unquote(p) for p in m.group(2).split("."))))

    def _region(self, start: int, owner: str) -> tuple[int, int]:
        """Lines from `start` to the next header that is not a sub-table of `owner`."""
        for n, _kind, name in self.headers:
            if n > start and name[0] != owner or (n > start and name == (owner,)):
                return start, n
        return start, len(self.lines) + 1

    def vm_header(self, index: int) -> int | None:
        vms = [n for n, kind, name in self.headers if kind == "[[" and name == ("vm",)]
        return vms[index] if index < len(vms) else None

    def table_header(self, name: str) -> int | None:
        for n, kind, hname in self.headers:
            if kind == "[" and hname == (name,):
                return n
        return None

    @staticmethod
    def _sets(key: str, sub: str | None = None) -> re.Pattern:
        """A line setting `key` (`key =`, `key.x =`), or with `sub` the dotted `key.sub =`."""
        def bare_or_quoted(k: str) -> str:
            k = re.escape(k)
            return rf"""(?:{k}|"{k}"|'{k}')"""
        if sub is None:
            return re.compile(rf"^\s*{bare_or_quoted(key)}\s*[=.]")
        return re.compile(rf"^\s*{bare_or_quoted(key)}\s*\.\s*{bare_or_quoted(sub)}\s*=")

    def key(self, start: int | None, owner: str, key: str, sub: str | None = None) -> int | None:
        """The first line in `owner`'s table starting at `start` that sets `key` (or its sub-table);
        with `sub`, the line of the dotted key or sub-table that sets `sub`, if there is one."""
        if start is None:
            return None
        lo, hi = self._region(start, owner)
        if sub is not None:
            dotted = self._sets(key, sub)
            for n in range(lo + 1, hi):
                if dotted.match(self.lines[n - 1]):
                    return n
            for n, _kind, name in self.headers:
                if lo < n < hi and name[1:] == (key,):  # [vm.backoff]: look inside it
                    end = next((m for m, _k, _n in self.headers if m > n), len(self.lines) + 1)
                    return next((m for m in range(n + 1, end) if self._sets(sub).match(self.lines[m - 1])), n)
        pattern = self._sets(key)
        for n in range(lo + 1, hi):
            if pattern.match(self.lines[n - 1]):
                return n
        for n, _kind, name in self.headers:
            if lo < n < hi and name[1:2] == (key,):
                return n
        return None

    def top_level(self, key: str) -> int | None:
        pattern = self._sets(key)
        first_header = self.headers[0][0] if self.headers else len(self.lines) + 1
        for n in range(1, first_header):
            if pattern.match(self.lines[n - 1]):
                return n
        for n, _kind, name in self.headers:
            if name[0] == key:
                return n
        return None


def syntax_line(message: str, lines: FleetLines) -> tuple[int, str]:
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if m:
        return int(m.group(1)), f"{message[:m.start()]} (column {m.group(2)})"
    m = re.search(r"\s*\(at end of document\)$", message)
    if m:
        return max(1, len(lines.lines)), f"{message[:m.start()]} (at the end of the file)"
    return 1, message
