"""Restart policy: when a VM that ended comes back, and when the supervisor gives up.

Anchored on supervisord's autorestart/startsecs/startretries and systemd's Restart=, with the fix
their users ask for most: exponential backoff *with a cap* and jitter, and a visible FATAL state
with its reason instead of a silent give-up.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from vmworker.settings import RESTART_POLICIES as POLICIES  # the names are the restart setting's


@dataclass(frozen=True)
class RestartPolicy:
    mode: str = "no"  # no | on-failure | always
    backoff_initial: float = 0.5  # seconds before the first restart
    backoff_max: float = 30.0  # the cap: backoff never grows past this
    backoff_jitter: float = 0.2  # ± this fraction, so a fleet does not restart in lockstep
    startsecs: float = 1.0  # a VM that ends sooner than this counts as a failed start
    retries: int = 5  # consecutive failed starts before FATAL

    def validate(self) -> "RestartPolicy":
        if self.mode not in POLICIES:
            raise ValueError(f"restart policy {self.mode!r} is not one of {', '.join(POLICIES)}")
        if not 0 < self.backoff_initial <= self.backoff_max:
            raise ValueError("backoff: need 0 < initial <= max")
        if not 0 <= self.backoff_jitter < 1:
            raise ValueError("backoff jitter must be in [0, 1)")
        if self.startsecs < 0 or self.retries < 0:
            raise ValueError("startsecs and retries must not be negative")
        return self

    def wants_restart(self, failed: bool) -> bool:
        """Whether an ended VM comes back at all (before counting retries)."""
        return self.mode == "always" or (self.mode == "on-failure" and failed)

    def delay(self, consecutive_failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before restart number `consecutive_failures` (1-based); capped, jittered."""
        rng = rng or random
        base = min(self.backoff_max, self.backoff_initial * (2 ** max(0, consecutive_failures - 1)))
        return min(self.backoff_max, base * (1 + rng.uniform(-self.backoff_jitter, self.backoff_jitter)))
