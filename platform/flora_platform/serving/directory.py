"""The engine replicas of one application, and HTTP requests broadcast to every one of them.

    directory = ReplicaDirectory()                                  # held by the ingress replica
    cursor, requests = await directory.poll(replica, cursor, 2.0)   # each engine replica, in a loop
    await directory.report(replica, seq, {"status": 200, "body": {...}})
    answers = await directory.broadcast(request, timeout_s=30)      # {replica: answer or None}

Serve routes a call to one replica and offers no public way to address a given one, so the
engine replicas come to the directory instead: each long-polls it for broadcast requests
(`poll` returns as soon as there is one, or after `wait_s`), runs them through its own HTTP app
and reports the answer. A replica counts as running while it polls: one silent for
`expiry_s` (stopped, killed, replaced) is no longer waited for. No Ray here.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque


class ReplicaDirectory:
    def __init__(self, expiry_s: float = 6.0, keep: int = 64):
        self.expiry_s = expiry_s
        self._seen: dict[str, float] = {}  # replica -> time.monotonic() of its latest poll
        self._requests: deque[tuple[int, dict]] = deque(maxlen=keep)
        self._answers: dict[int, dict[str, dict]] = {}
        self._seq = 0
        self._changed = asyncio.Condition()

    def replicas(self) -> list[str]:
        """The replicas that polled within `expiry_s`."""
        horizon = time.monotonic() - self.expiry_s
        for replica in [r for r, seen in self._seen.items() if seen < horizon]:
            del self._seen[replica]
        return sorted(self._seen)

    async def poll(self, replica: str, cursor: int | None, wait_s: float) -> tuple[int, list[tuple[int, dict]]]:
        """Requests broadcast after `cursor` (None: a new replica, which starts from now), waiting
        up to `wait_s` for one; returns the new cursor and the requests."""
        self._seen[replica] = time.monotonic()
        if cursor is None:
            return self._seq, []
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self._seq > cursor), wait_s)
            except asyncio.TimeoutError:
                pass
        self._seen[replica] = time.monotonic()
        return self._seq, [(seq, request) for seq, request in self._requests if seq > cursor]

    async def report(self, replica: str, seq: int, answer: dict) -> None:
        self._seen[replica] = time.monotonic()
        if seq in self._answers:
            async with self._changed:
                self._answers[seq][replica] = answer
                self._changed.notify_all()

    def leave(self, replica: str) -> None:
        self._seen.pop(replica, None)

    async def broadcast(self, request: dict, timeout_s: float) -> dict[str, dict | None]:
        """Send `request` to every running replica; their answers (None: no answer within
        `timeout_s`, from a replica still running then). Replicas that stop meanwhile drop out."""
        expected = set(self.replicas())
        async with self._changed:
            self._seq += 1
            seq = self._seq
            self._answers[seq] = {}
            self._requests.append((seq, request))
            self._changed.notify_all()
        answers = self._answers[seq]
        deadline = time.monotonic() + timeout_s

        def complete() -> bool:
            return expected & set(self.replicas()) <= set(answers)

        try:
            async with self._changed:
                while not complete() and time.monotonic() < deadline:
                    try:  # wake up now and then: a replica that went silent drops out of `expected`
                        await asyncio.wait_for(self._changed.wait_for(complete), min(1.0, max(deadline - time.monotonic(), 0.01)))
                    except asyncio.TimeoutError:
                        pass
        finally:
            del self._answers[seq]
        running = set(self.replicas())
        return {replica: answers.get(replica) for replica in sorted(expected & running | set(answers))}
