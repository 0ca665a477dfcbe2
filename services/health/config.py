"""Health monitor configuration (AGENTMESH_<FIELD> variables and CLI flags)."""

from __future__ import annotations

from dataclasses import dataclass

from services._common.config import ServiceConfig


@dataclass(frozen=True, kw_only=True)
class HealthConfig(ServiceConfig):
    """Every threshold of the monitor. The state defaults are the design's (2 / 5 / 10 s)."""

    heartbeat_interval_s: float = 1.0
    """How often agents send a heartbeat (told to them in the welcome)."""
    degraded_after_s: float = 2.0
    """Response time from which an agent is DEGRADED. Response is how long the agent has
    gone without answering: the time since its last heartbeat, or the loop lag its
    last heartbeat reported, whichever is longer."""
    critical_after_s: float = 5.0
    """Response time from which an agent is CRITICAL."""
    failed_after_s: float = 10.0
    """No heartbeat for this long: FAILED (its claims released, a replacement ordered)."""
    reconnect_grace_s: float = 5.0
    """An agent whose Report stream closed and did not come back within this: FAILED."""
    takeover_grace_s: float = 5.0
    """A monitor that just took over judges no agent it has not heard from yet for this
    long (their streams are reconnecting); their silence still counts from the takeover,
    so an agent that never comes back is FAILED `failed_after_s` after it."""
    stall_limit_s: float = 60.0
    """A task with no progress for this long, while its agent keeps heartbeating, is hung:
    its claim is released and it is requeued. Set it above the longest silent stretch of
    your slowest executor, or have executors report progress."""
    deadline_grace_s: float = 5.0
    """A task still running this long past its own deadline is hung too."""
    cancel_grace_s: float = 3.0
    """A released task its agent still runs after this long (the executor ignored the
    cancel, or blocks a thread): the agent is replaced."""
    baseline_alpha: float = 0.05
    """Weight of each task latency in the agent's baseline (slow moving average)."""
    recent_alpha: float = 0.3
    """Weight of each task latency in the agent's recent latency (fast moving average)."""
    baseline_min_samples: int = 20
    """Latencies an agent must have reported before its baseline is trusted."""
    predictive_rise: float = 0.5
    """Recent latency this far over the baseline (0.5: +50 %) raises a predictive alert..."""
    predictive_window_s: float = 30.0
    """... when it stays there for this long."""
    rebaseline_after_s: float = 300.0
    """A rise that lasts this long becomes the new baseline (the alert closes)."""
    breaker_consecutive: int = 5
    """Failures in a row that open an agent's circuit breaker (eject it)."""
    breaker_error_rate: float = 0.5
    """An error rate at or over this within `breaker_window_s` opens the breaker too..."""
    breaker_window_s: float = 30.0
    """... counted over this window..."""
    breaker_min_outcomes: int = 10
    """... once the window holds at least this many outcomes."""
    ejection_base_s: float = 30.0
    """First ejection's length; the n-th lasts n times as long (outlier ejection)."""
    ejection_max_s: float = 300.0
    """Longest ejection. An agent that stays healthy this long after an ejection has its
    ejection count lowered by one."""
    max_ejected_share: float = 0.5
    """Never more than this share of the live agents ejected at once."""
    max_replacements: int = 3
    """Failed replacements in a row after which recovery stops and escalates."""
    replace_timeout_s: float = 30.0
    """A replacement that has not heartbeated within this long failed."""
    replace_probation_s: float = 60.0
    """A replacement that fails (or is replaced) within this long failed too."""
    replace_retry_s: float = 5.0
    """Wait before trying again after a replacement failed."""
    forget_after_s: float = 3600.0
    """A FAILED agent's record is deleted after this long."""
    tick_s: float = 0.05
    """How often timers are checked (hang detection is this much late at most); each
    tick looks at every agent (under 1 µs each here: 0.3 % of a core for 200 agents)."""

    def __post_init__(self) -> None:
        if not 0 < self.degraded_after_s < self.critical_after_s < self.failed_after_s:
            raise ValueError(
                "health thresholds must grow: 0 < degraded_after_s < critical_after_s < failed_after_s"
            )
        if self.heartbeat_interval_s <= 0 or self.heartbeat_interval_s >= self.degraded_after_s:
            raise ValueError("heartbeat_interval_s must be positive and below degraded_after_s")
        if not 0 <= self.max_ejected_share <= 1:
            raise ValueError("max_ejected_share must be between 0 and 1")
        if self.breaker_consecutive < 1 or self.max_replacements < 1:
            raise ValueError("breaker_consecutive and max_replacements must be at least 1")
        for name in (
            "stall_limit_s",
            "reconnect_grace_s",
            "ejection_base_s",
            "tick_s",
            "predictive_window_s",
            "breaker_window_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
