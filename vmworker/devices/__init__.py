"""Emulated devices. Each device is one small class behind the bus interface in `bus.py`."""
