"""Admission policy: highest priority first, first come first served within a priority.

Plain data and logic (no Ray), so it is tested on its own. Jobs hold a slot while they run; a
running job whose heartbeats stop for ``lease_s`` seconds (its driver was killed) is marked
``lost`` and its slot goes to the next job. A queued job whose driver disappears is dropped the
same way, so a dead submission never blocks the queue.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

ACTIVE = ("queued", "running")


@dataclass
class Entry:
    job_id: str
    priority: int
    seq: int
    state: str = "queued"
    last_seen: float = field(default_factory=time.time)


class JobQueue:
    def __init__(self, *, max_running: int = 1, lease_s: float = 60.0):
        if max_running < 1:
            raise ValueError("max_running must be >= 1")
        self.max_running = max_running
        self.lease_s = lease_s
        self.entries: dict[str, Entry] = {}
        self._seq = itertools.count()

    def enqueue(self, job_id: str, priority: int = 0, now: float | None = None) -> None:
        """Add a job (or refresh it if its driver restarted: it keeps its place in the queue)."""
        now = time.time() if now is None else now
        entry = self.entries.get(job_id)
        if entry is not None and entry.state in ACTIVE:
            entry.state, entry.last_seen = "queued", now
            return
        self.entries[job_id] = Entry(job_id, priority, next(self._seq), last_seen=now)

    def try_admit(self, job_id: str, now: float | None = None) -> bool:
        """True if ``job_id`` may start now (and mark it running)."""
        now = time.time() if now is None else now
        self.expire(now)
        entry = self.entries.get(job_id)
        if entry is None:
            raise KeyError(f"job {job_id} is not queued")
        entry.last_seen = now
        if entry.state == "running":
            return True
        if entry.state != "queued":
            return False
        running = sum(e.state == "running" for e in self.entries.values())
        if running < self.max_running and self.waiting()[0] == job_id:
            entry.state = "running"
            return True
        return False

    def heartbeat(self, job_id: str, now: float | None = None) -> None:
        entry = self.entries.get(job_id)
        if entry is not None:
            entry.last_seen = time.time() if now is None else now

    def finish(self, job_id: str, state: str) -> None:
        entry = self.entries.get(job_id)
        if entry is not None:
            entry.state = state

    def waiting(self) -> list[str]:
        """Queued job ids in admission order."""
        queued = [e for e in self.entries.values() if e.state == "queued"]
        return [e.job_id for e in sorted(queued, key=lambda e: (-e.priority, e.seq))]

    def position(self, job_id: str) -> int | None:
        """1-based place in the queue, None if not queued."""
        order = self.waiting()
        return order.index(job_id) + 1 if job_id in order else None

    def expire(self, now: float | None = None) -> list[str]:
        """Mark jobs whose driver went silent as lost; returns their ids."""
        now = time.time() if now is None else now
        lost = [e for e in self.entries.values() if e.state in ACTIVE and now - e.last_seen > self.lease_s]
        for e in lost:
            e.state = "lost"
        return [e.job_id for e in lost]
