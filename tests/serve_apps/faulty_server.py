"""A test-only subclass of the Serve deployment with switches on its engine's forward, called
through a Serve handle (never over HTTP): stall it (a kernel that does not return) until
resumed, or break it for good (a sticky device error). The replica imports this module by name,
so it holds nothing but the class."""

from __future__ import annotations

import threading

from serve_apps.flora_server import FloraServer


class SwitchableFloraServer(FloraServer.func_or_class):
    def stall_forward(self, max_s: float = 60.0) -> None:
        """Every forward waits (at most `max_s`) until `resume_forward`."""
        runner = self.service.engine.runner
        self._forward, self._resume = runner.forward, threading.Event()
        forward, resume = self._forward, self._resume

        def stalled(inputs):
            resume.wait(max_s)
            return forward(inputs)

        runner.forward = stalled

    def resume_forward(self) -> None:
        self.service.engine.runner.forward = self._forward
        self._resume.set()

    def break_forward(self) -> None:
        """Every forward raises from now on, as after a sticky CUDA error."""

        def broken(inputs):
            raise RuntimeError("injected by the test: CUDA error: an illegal memory access was encountered")

        self.service.engine.runner.forward = broken
