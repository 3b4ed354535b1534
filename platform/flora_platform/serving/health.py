"""Whether a replica should be replaced: the engine's own figures against `HealthSpec`.

    status = service.health_status()        # {"alive", "has_work", "last_ok_step_age_s", "failed_steps"}
    problem = diagnose(status, cfg.health)  # None, or why the replica cannot serve

The engine catches every exception per step so that one bad request fails alone; the price is
that a fault no step can get past (a sticky CUDA error, a kernel that never returns, memory
that never comes back) would answer 500 or 504 forever from a replica that looks alive. Serve
replaces a replica whose `check_health` raises; this is what it raises on.

A stall counts only while requests wait: an idle engine steps (and so stays fresh) every
`idle_wait_s` anyway, but a replica with nothing to do has no reason to be replaced.
"""

from __future__ import annotations

from flora_platform.serving.config import HealthSpec


class Unhealthy(RuntimeError):
    """The replica cannot serve any more (Serve replaces it)."""


def diagnose(status: dict, spec: HealthSpec) -> str | None:
    """Why the replica should be replaced, or None while it is healthy.

    status: `alive` (the engine thread runs), and where the service has an engine with step
    figures: `has_work` (requests queued or running), `last_ok_step_age_s` (seconds since a
    step last ended without a failed forward), `failed_steps` (steps in a row whose every
    forward failed).
    """
    if not status["alive"]:
        return "the engine loop has stopped"
    failed = status.get("failed_steps", 0)
    if failed >= spec.max_failed_steps:
        return (f"{failed} engine steps in a row failed every forward (health.max_failed_steps="
                f"{spec.max_failed_steps}): the device or model is broken for every request")
    age = status.get("last_ok_step_age_s", 0.0)
    if status.get("has_work") and age >= spec.stall_timeout_s:
        return (f"requests are waiting and no engine step has succeeded for {age:.1f} s "
                f"(health.stall_timeout_s={spec.stall_timeout_s:g}): the engine is stuck")
    return None


def check(status: dict, spec: HealthSpec) -> None:
    """Raise `Unhealthy` naming the reason (`diagnose`)."""
    problem = diagnose(status, spec)
    if problem is not None:
        raise Unhealthy(problem)
