from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HealthState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEALTH_STATE_UNSPECIFIED: _ClassVar[HealthState]
    HEALTH_STATE_HEALTHY: _ClassVar[HealthState]
    HEALTH_STATE_DEGRADED: _ClassVar[HealthState]
    HEALTH_STATE_CRITICAL: _ClassVar[HealthState]
    HEALTH_STATE_FAILED: _ClassVar[HealthState]

class BreakerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BREAKER_STATE_UNSPECIFIED: _ClassVar[BreakerState]
    BREAKER_STATE_CLOSED: _ClassVar[BreakerState]
    BREAKER_STATE_OPEN: _ClassVar[BreakerState]
    BREAKER_STATE_HALF_OPEN: _ClassVar[BreakerState]

class Admission(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADMISSION_UNSPECIFIED: _ClassVar[Admission]
    ADMISSION_ALL: _ClassVar[Admission]
    ADMISSION_ONE: _ClassVar[Admission]
    ADMISSION_NONE: _ClassVar[Admission]

class AlertKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALERT_KIND_UNSPECIFIED: _ClassVar[AlertKind]
    ALERT_KIND_PREDICTIVE: _ClassVar[AlertKind]
    ALERT_KIND_STATE: _ClassVar[AlertKind]
    ALERT_KIND_HUNG_TASK: _ClassVar[AlertKind]
    ALERT_KIND_EJECTED: _ClassVar[AlertKind]
    ALERT_KIND_EJECTION_CAP: _ClassVar[AlertKind]
    ALERT_KIND_ESCALATION: _ClassVar[AlertKind]

class RecoveryKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECOVERY_KIND_UNSPECIFIED: _ClassVar[RecoveryKind]
    RECOVERY_KIND_RELEASE: _ClassVar[RecoveryKind]
    RECOVERY_KIND_REPLACE: _ClassVar[RecoveryKind]
    RECOVERY_KIND_DRAIN: _ClassVar[RecoveryKind]
HEALTH_STATE_UNSPECIFIED: HealthState
HEALTH_STATE_HEALTHY: HealthState
HEALTH_STATE_DEGRADED: HealthState
HEALTH_STATE_CRITICAL: HealthState
HEALTH_STATE_FAILED: HealthState
BREAKER_STATE_UNSPECIFIED: BreakerState
BREAKER_STATE_CLOSED: BreakerState
BREAKER_STATE_OPEN: BreakerState
BREAKER_STATE_HALF_OPEN: BreakerState
ADMISSION_UNSPECIFIED: Admission
ADMISSION_ALL: Admission
ADMISSION_ONE: Admission
ADMISSION_NONE: Admission
ALERT_KIND_UNSPECIFIED: AlertKind
ALERT_KIND_PREDICTIVE: AlertKind
ALERT_KIND_STATE: AlertKind
ALERT_KIND_HUNG_TASK: AlertKind
ALERT_KIND_EJECTED: AlertKind
ALERT_KIND_EJECTION_CAP: AlertKind
ALERT_KIND_ESCALATION: AlertKind
RECOVERY_KIND_UNSPECIFIED: RecoveryKind
RECOVERY_KIND_RELEASE: RecoveryKind
RECOVERY_KIND_REPLACE: RecoveryKind
RECOVERY_KIND_DRAIN: RecoveryKind

class Heartbeat(_message.Message):
    __slots__ = ("agent_id", "info", "sent_at_us", "seq", "tasks", "outcomes", "completed", "failed", "loop_lag_ms", "process", "paused", "draining", "leaving")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_US_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    LOOP_LAG_MS_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    info: AgentInfo
    sent_at_us: int
    seq: int
    tasks: _containers.RepeatedCompositeFieldContainer[TaskInFlight]
    outcomes: _containers.RepeatedCompositeFieldContainer[TaskOutcome]
    completed: int
    failed: int
    loop_lag_ms: float
    process: ProcessStats
    paused: bool
    draining: bool
    leaving: bool
    def __init__(self, agent_id: _Optional[str] = ..., info: _Optional[_Union[AgentInfo, _Mapping]] = ..., sent_at_us: _Optional[int] = ..., seq: _Optional[int] = ..., tasks: _Optional[_Iterable[_Union[TaskInFlight, _Mapping]]] = ..., outcomes: _Optional[_Iterable[_Union[TaskOutcome, _Mapping]]] = ..., completed: _Optional[int] = ..., failed: _Optional[int] = ..., loop_lag_ms: _Optional[float] = ..., process: _Optional[_Union[ProcessStats, _Mapping]] = ..., paused: _Optional[bool] = ..., draining: _Optional[bool] = ..., leaving: _Optional[bool] = ...) -> None: ...

class AgentInfo(_message.Message):
    __slots__ = ("pool_id", "incarnation", "kinds", "roles", "labels", "capacity", "replaces")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    REPLACES_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    incarnation: str
    kinds: _containers.RepeatedScalarFieldContainer[str]
    roles: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    capacity: int
    replaces: str
    def __init__(self, pool_id: _Optional[str] = ..., incarnation: _Optional[str] = ..., kinds: _Optional[_Iterable[str]] = ..., roles: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., capacity: _Optional[int] = ..., replaces: _Optional[str] = ...) -> None: ...

class TaskInFlight(_message.Message):
    __slots__ = ("task_id", "claim_token", "started_at_us", "last_progress_at_us", "timeout_s")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CLAIM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_US_FIELD_NUMBER: _ClassVar[int]
    LAST_PROGRESS_AT_US_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    claim_token: int
    started_at_us: int
    last_progress_at_us: int
    timeout_s: float
    def __init__(self, task_id: _Optional[str] = ..., claim_token: _Optional[int] = ..., started_at_us: _Optional[int] = ..., last_progress_at_us: _Optional[int] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class TaskOutcome(_message.Message):
    __slots__ = ("task_id", "ok", "latency_ms", "error", "retryable")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    ok: bool
    latency_ms: float
    error: str
    retryable: bool
    def __init__(self, task_id: _Optional[str] = ..., ok: _Optional[bool] = ..., latency_ms: _Optional[float] = ..., error: _Optional[str] = ..., retryable: _Optional[bool] = ...) -> None: ...

class ProcessStats(_message.Message):
    __slots__ = ("rss_bytes", "cpu_seconds", "agents")
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    rss_bytes: int
    cpu_seconds: float
    agents: int
    def __init__(self, rss_bytes: _Optional[int] = ..., cpu_seconds: _Optional[float] = ..., agents: _Optional[int] = ...) -> None: ...

class HealthDirective(_message.Message):
    __slots__ = ("welcome", "pause", "resume", "drain", "replace", "redirect")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    PAUSE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    REDIRECT_FIELD_NUMBER: _ClassVar[int]
    welcome: HealthWelcome
    pause: PauseAgent
    resume: ResumeAgent
    drain: DrainAgent
    replace: ReplaceAgent
    redirect: HealthRedirect
    def __init__(self, welcome: _Optional[_Union[HealthWelcome, _Mapping]] = ..., pause: _Optional[_Union[PauseAgent, _Mapping]] = ..., resume: _Optional[_Union[ResumeAgent, _Mapping]] = ..., drain: _Optional[_Union[DrainAgent, _Mapping]] = ..., replace: _Optional[_Union[ReplaceAgent, _Mapping]] = ..., redirect: _Optional[_Union[HealthRedirect, _Mapping]] = ...) -> None: ...

class HealthWelcome(_message.Message):
    __slots__ = ("monitor_id", "term", "heartbeat_interval_s")
    MONITOR_ID_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    monitor_id: str
    term: int
    heartbeat_interval_s: float
    def __init__(self, monitor_id: _Optional[str] = ..., term: _Optional[int] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class PauseAgent(_message.Message):
    __slots__ = ("reason", "until_us")
    REASON_FIELD_NUMBER: _ClassVar[int]
    UNTIL_US_FIELD_NUMBER: _ClassVar[int]
    reason: str
    until_us: int
    def __init__(self, reason: _Optional[str] = ..., until_us: _Optional[int] = ...) -> None: ...

class ResumeAgent(_message.Message):
    __slots__ = ("reason", "half_open")
    REASON_FIELD_NUMBER: _ClassVar[int]
    HALF_OPEN_FIELD_NUMBER: _ClassVar[int]
    reason: str
    half_open: bool
    def __init__(self, reason: _Optional[str] = ..., half_open: _Optional[bool] = ...) -> None: ...

class DrainAgent(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class ReplaceAgent(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class HealthRedirect(_message.Message):
    __slots__ = ("monitor_endpoint",)
    MONITOR_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    monitor_endpoint: str
    def __init__(self, monitor_endpoint: _Optional[str] = ...) -> None: ...

class AgentHealth(_message.Message):
    __slots__ = ("agent_id", "pool_id", "state", "state_since_us", "reason", "response_s", "baseline_latency_ms", "recent_latency_ms", "breaker", "consecutive_failures", "ejections", "ejected_until_us", "admission", "tasks_in_flight", "completed", "failed", "rss_bytes", "cpu_seconds", "connected", "last_heartbeat_us", "replaces", "replaced_by", "replacement_failures", "escalated", "info", "term", "hung_tasks", "latency_alert", "registered")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATE_SINCE_US_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_S_FIELD_NUMBER: _ClassVar[int]
    BASELINE_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    RECENT_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    BREAKER_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    EJECTIONS_FIELD_NUMBER: _ClassVar[int]
    EJECTED_UNTIL_US_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_FIELD_NUMBER: _ClassVar[int]
    TASKS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_US_FIELD_NUMBER: _ClassVar[int]
    REPLACES_FIELD_NUMBER: _ClassVar[int]
    REPLACED_BY_FIELD_NUMBER: _ClassVar[int]
    REPLACEMENT_FAILURES_FIELD_NUMBER: _ClassVar[int]
    ESCALATED_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    HUNG_TASKS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_ALERT_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    pool_id: str
    state: HealthState
    state_since_us: int
    reason: str
    response_s: float
    baseline_latency_ms: float
    recent_latency_ms: float
    breaker: BreakerState
    consecutive_failures: int
    ejections: int
    ejected_until_us: int
    admission: Admission
    tasks_in_flight: int
    completed: int
    failed: int
    rss_bytes: int
    cpu_seconds: float
    connected: bool
    last_heartbeat_us: int
    replaces: str
    replaced_by: str
    replacement_failures: int
    escalated: bool
    info: AgentInfo
    term: int
    hung_tasks: int
    latency_alert: bool
    registered: bool
    def __init__(self, agent_id: _Optional[str] = ..., pool_id: _Optional[str] = ..., state: _Optional[_Union[HealthState, str]] = ..., state_since_us: _Optional[int] = ..., reason: _Optional[str] = ..., response_s: _Optional[float] = ..., baseline_latency_ms: _Optional[float] = ..., recent_latency_ms: _Optional[float] = ..., breaker: _Optional[_Union[BreakerState, str]] = ..., consecutive_failures: _Optional[int] = ..., ejections: _Optional[int] = ..., ejected_until_us: _Optional[int] = ..., admission: _Optional[_Union[Admission, str]] = ..., tasks_in_flight: _Optional[int] = ..., completed: _Optional[int] = ..., failed: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., cpu_seconds: _Optional[float] = ..., connected: _Optional[bool] = ..., last_heartbeat_us: _Optional[int] = ..., replaces: _Optional[str] = ..., replaced_by: _Optional[str] = ..., replacement_failures: _Optional[int] = ..., escalated: _Optional[bool] = ..., info: _Optional[_Union[AgentInfo, _Mapping]] = ..., term: _Optional[int] = ..., hung_tasks: _Optional[int] = ..., latency_alert: _Optional[bool] = ..., registered: _Optional[bool] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("alert_id", "kind", "agent_id", "task_id", "message", "opened_at_us", "closed_at_us")
    ALERT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OPENED_AT_US_FIELD_NUMBER: _ClassVar[int]
    CLOSED_AT_US_FIELD_NUMBER: _ClassVar[int]
    alert_id: str
    kind: AlertKind
    agent_id: str
    task_id: str
    message: str
    opened_at_us: int
    closed_at_us: int
    def __init__(self, alert_id: _Optional[str] = ..., kind: _Optional[_Union[AlertKind, str]] = ..., agent_id: _Optional[str] = ..., task_id: _Optional[str] = ..., message: _Optional[str] = ..., opened_at_us: _Optional[int] = ..., closed_at_us: _Optional[int] = ...) -> None: ...

class GetHealthRequest(_message.Message):
    __slots__ = ("agent_id",)
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    def __init__(self, agent_id: _Optional[str] = ...) -> None: ...

class ListAgentHealthRequest(_message.Message):
    __slots__ = ("states", "page_size", "page_token")
    STATES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[HealthState]
    page_size: int
    page_token: str
    def __init__(self, states: _Optional[_Iterable[_Union[HealthState, str]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAgentHealthResponse(_message.Message):
    __slots__ = ("agents", "next_page_token")
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentHealth]
    next_page_token: str
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentHealth, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetHealthSummaryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthSummary(_message.Message):
    __slots__ = ("monitor_id", "monitor_endpoint", "term", "state_counts", "ejected", "half_open", "connected", "reporting", "open_alerts", "open_alert_count", "heartbeats", "hung_released", "replacements", "failed_declared", "term_started_at_us")
    class StateCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MONITOR_ID_FIELD_NUMBER: _ClassVar[int]
    MONITOR_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    STATE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    EJECTED_FIELD_NUMBER: _ClassVar[int]
    HALF_OPEN_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    REPORTING_FIELD_NUMBER: _ClassVar[int]
    OPEN_ALERTS_FIELD_NUMBER: _ClassVar[int]
    OPEN_ALERT_COUNT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEATS_FIELD_NUMBER: _ClassVar[int]
    HUNG_RELEASED_FIELD_NUMBER: _ClassVar[int]
    REPLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    FAILED_DECLARED_FIELD_NUMBER: _ClassVar[int]
    TERM_STARTED_AT_US_FIELD_NUMBER: _ClassVar[int]
    monitor_id: str
    monitor_endpoint: str
    term: int
    state_counts: _containers.ScalarMap[str, int]
    ejected: int
    half_open: int
    connected: int
    reporting: int
    open_alerts: _containers.RepeatedCompositeFieldContainer[Alert]
    open_alert_count: int
    heartbeats: int
    hung_released: int
    replacements: int
    failed_declared: int
    term_started_at_us: int
    def __init__(self, monitor_id: _Optional[str] = ..., monitor_endpoint: _Optional[str] = ..., term: _Optional[int] = ..., state_counts: _Optional[_Mapping[str, int]] = ..., ejected: _Optional[int] = ..., half_open: _Optional[int] = ..., connected: _Optional[int] = ..., reporting: _Optional[int] = ..., open_alerts: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ..., open_alert_count: _Optional[int] = ..., heartbeats: _Optional[int] = ..., hung_released: _Optional[int] = ..., replacements: _Optional[int] = ..., failed_declared: _Optional[int] = ..., term_started_at_us: _Optional[int] = ...) -> None: ...

class WatchHealthRequest(_message.Message):
    __slots__ = ("agent_ids",)
    AGENT_IDS_FIELD_NUMBER: _ClassVar[int]
    agent_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, agent_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class HealthEvent(_message.Message):
    __slots__ = ("change", "alert", "recovery", "at_us", "term")
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    ALERT_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_FIELD_NUMBER: _ClassVar[int]
    AT_US_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    change: HealthChange
    alert: Alert
    recovery: RecoveryAction
    at_us: int
    term: int
    def __init__(self, change: _Optional[_Union[HealthChange, _Mapping]] = ..., alert: _Optional[_Union[Alert, _Mapping]] = ..., recovery: _Optional[_Union[RecoveryAction, _Mapping]] = ..., at_us: _Optional[int] = ..., term: _Optional[int] = ...) -> None: ...

class HealthChange(_message.Message):
    __slots__ = ("agent_id", "previous", "state", "breaker", "admission", "reason", "removed")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BREAKER_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    previous: HealthState
    state: HealthState
    breaker: BreakerState
    admission: Admission
    reason: str
    removed: bool
    def __init__(self, agent_id: _Optional[str] = ..., previous: _Optional[_Union[HealthState, str]] = ..., state: _Optional[_Union[HealthState, str]] = ..., breaker: _Optional[_Union[BreakerState, str]] = ..., admission: _Optional[_Union[Admission, str]] = ..., reason: _Optional[str] = ..., removed: _Optional[bool] = ...) -> None: ...

class RecoveryAction(_message.Message):
    __slots__ = ("kind", "agent_id", "task_ids", "new_agent_id", "ok", "detail")
    KIND_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    NEW_AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    kind: RecoveryKind
    agent_id: str
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    new_agent_id: str
    ok: bool
    detail: str
    def __init__(self, kind: _Optional[_Union[RecoveryKind, str]] = ..., agent_id: _Optional[str] = ..., task_ids: _Optional[_Iterable[str]] = ..., new_agent_id: _Optional[str] = ..., ok: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...
