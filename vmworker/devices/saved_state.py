"""Device state for snapshots (vmworker/snapshot.py): a device names the attributes that hold
its guest-visible state in `SAVED`; `state()` gives them as msgpack-able values and `restore()`
puts them back, each into the same kind of container it came from."""

from __future__ import annotations

from collections import deque

from ..errors import SpecError


class SavedFields:
    SAVED: tuple[str, ...] = ()

    def state(self) -> dict:
        out = {}
        for name in self.SAVED:
            value = getattr(self, name)
            if isinstance(value, deque):
                value = list(value)
            elif isinstance(value, bytearray):
                value = bytes(value)
            out[name] = value
        return out

    def restore(self, state: dict) -> None:
        """Put saved values back; SpecError naming the field when one does not fit."""
        if not isinstance(state, dict):
            raise SpecError(f"device {getattr(self, 'name', '?')}: saved state is not a map")
        for name in self.SAVED:
            if name not in state:
                continue  # saved by an older device model: keep the reset value
            current, value = getattr(self, name), state[name]
            if isinstance(current, deque):
                value = deque(int(v) for v in value)
            elif isinstance(current, bytearray):
                if not isinstance(value, bytes) or len(value) != len(current):
                    raise SpecError(f"device {self.name}: saved {name} has the wrong size")
                value = bytearray(value)
            elif current is not None and value is not None and type(value) is not type(current):
                raise SpecError(f"device {self.name}: saved {name} is a {type(value).__name__}")
            setattr(self, name, value)
