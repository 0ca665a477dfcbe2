from protos.agentmesh.v1 import task_pb2 as _task_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskView(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_VIEW_UNSPECIFIED: _ClassVar[TaskView]
    TASK_VIEW_BASIC: _ClassVar[TaskView]
    TASK_VIEW_FULL: _ClassVar[TaskView]
TASK_VIEW_UNSPECIFIED: TaskView
TASK_VIEW_BASIC: TaskView
TASK_VIEW_FULL: TaskView

class SubmitRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: _task_pb2.TaskSpec
    def __init__(self, spec: _Optional[_Union[_task_pb2.TaskSpec, _Mapping]] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("task", "created")
    TASK_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    task: _task_pb2.Task
    created: bool
    def __init__(self, task: _Optional[_Union[_task_pb2.Task, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class SubmitBatchRequest(_message.Message):
    __slots__ = ("specs",)
    SPECS_FIELD_NUMBER: _ClassVar[int]
    specs: _containers.RepeatedCompositeFieldContainer[_task_pb2.TaskSpec]
    def __init__(self, specs: _Optional[_Iterable[_Union[_task_pb2.TaskSpec, _Mapping]]] = ...) -> None: ...

class SubmitBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SubmitResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[SubmitResponse, _Mapping]]] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class CancelTaskRequest(_message.Message):
    __slots__ = ("task_id", "reason")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    reason: str
    def __init__(self, task_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("states", "kind", "agent_id", "page_size", "page_token", "view")
    STATES_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[_task_pb2.TaskState]
    kind: str
    agent_id: str
    page_size: int
    page_token: str
    view: TaskView
    def __init__(self, states: _Optional[_Iterable[_Union[_task_pb2.TaskState, str]]] = ..., kind: _Optional[str] = ..., agent_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., view: _Optional[_Union[TaskView, str]] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks", "next_page_token")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[_task_pb2.Task]
    next_page_token: str
    def __init__(self, tasks: _Optional[_Iterable[_Union[_task_pb2.Task, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("states", "view", "max_batch")
    STATES_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[_task_pb2.TaskState]
    view: TaskView
    max_batch: int
    def __init__(self, states: _Optional[_Iterable[_Union[_task_pb2.TaskState, str]]] = ..., view: _Optional[_Union[TaskView, str]] = ..., max_batch: _Optional[int] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class AgentStatus(_message.Message):
    __slots__ = ("agent_id", "pool_id", "roles", "labels", "kinds", "capacity", "inflight", "completed", "failed", "latency_ema_ms", "draining", "connected_at_us", "health_admission", "llm_calls", "llm_usage")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    LATENCY_EMA_MS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_AT_US_FIELD_NUMBER: _ClassVar[int]
    HEALTH_ADMISSION_FIELD_NUMBER: _ClassVar[int]
    LLM_CALLS_FIELD_NUMBER: _ClassVar[int]
    LLM_USAGE_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    pool_id: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    kinds: _containers.RepeatedScalarFieldContainer[str]
    capacity: int
    inflight: int
    completed: int
    failed: int
    latency_ema_ms: float
    draining: bool
    connected_at_us: int
    health_admission: str
    llm_calls: int
    llm_usage: _task_pb2.TokenUsage
    def __init__(self, agent_id: _Optional[str] = ..., pool_id: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., kinds: _Optional[_Iterable[str]] = ..., capacity: _Optional[int] = ..., inflight: _Optional[int] = ..., completed: _Optional[int] = ..., failed: _Optional[int] = ..., latency_ema_ms: _Optional[float] = ..., draining: _Optional[bool] = ..., connected_at_us: _Optional[int] = ..., health_admission: _Optional[str] = ..., llm_calls: _Optional[int] = ..., llm_usage: _Optional[_Union[_task_pb2.TokenUsage, _Mapping]] = ...) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents", "next_page_token")
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentStatus]
    next_page_token: str
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentStatus, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServiceInstance(_message.Message):
    __slots__ = ("kind", "instance_id", "endpoint", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    kind: str
    instance_id: str
    endpoint: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, kind: _Optional[str] = ..., instance_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("leader_endpoint", "leader_id", "term", "standbys", "agents_connected", "queue_depth", "task_counts", "services", "assignment_strategy", "llm_waiting", "llm_costs", "llm_budgets", "from_leader")
    class TaskCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    LEADER_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    STANDBYS_FIELD_NUMBER: _ClassVar[int]
    AGENTS_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    TASK_COUNTS_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    LLM_WAITING_FIELD_NUMBER: _ClassVar[int]
    LLM_COSTS_FIELD_NUMBER: _ClassVar[int]
    LLM_BUDGETS_FIELD_NUMBER: _ClassVar[int]
    FROM_LEADER_FIELD_NUMBER: _ClassVar[int]
    leader_endpoint: str
    leader_id: str
    term: int
    standbys: _containers.RepeatedCompositeFieldContainer[ServiceInstance]
    agents_connected: int
    queue_depth: int
    task_counts: _containers.ScalarMap[str, int]
    services: _containers.RepeatedCompositeFieldContainer[ServiceInstance]
    assignment_strategy: str
    llm_waiting: _containers.RepeatedScalarFieldContainer[str]
    llm_costs: _containers.RepeatedCompositeFieldContainer[CostTotal]
    llm_budgets: _containers.RepeatedCompositeFieldContainer[BudgetStatus]
    from_leader: bool
    def __init__(self, leader_endpoint: _Optional[str] = ..., leader_id: _Optional[str] = ..., term: _Optional[int] = ..., standbys: _Optional[_Iterable[_Union[ServiceInstance, _Mapping]]] = ..., agents_connected: _Optional[int] = ..., queue_depth: _Optional[int] = ..., task_counts: _Optional[_Mapping[str, int]] = ..., services: _Optional[_Iterable[_Union[ServiceInstance, _Mapping]]] = ..., assignment_strategy: _Optional[str] = ..., llm_waiting: _Optional[_Iterable[str]] = ..., llm_costs: _Optional[_Iterable[_Union[CostTotal, _Mapping]]] = ..., llm_budgets: _Optional[_Iterable[_Union[BudgetStatus, _Mapping]]] = ..., from_leader: _Optional[bool] = ...) -> None: ...

class CostTotal(_message.Message):
    __slots__ = ("dimension", "key", "calls", "usage")
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    dimension: str
    key: str
    calls: int
    usage: _task_pb2.TokenUsage
    def __init__(self, dimension: _Optional[str] = ..., key: _Optional[str] = ..., calls: _Optional[int] = ..., usage: _Optional[_Union[_task_pb2.TokenUsage, _Mapping]] = ...) -> None: ...

class BudgetStatus(_message.Message):
    __slots__ = ("name", "cap_usd", "spent_usd")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CAP_USD_FIELD_NUMBER: _ClassVar[int]
    SPENT_USD_FIELD_NUMBER: _ClassVar[int]
    name: str
    cap_usd: float
    spent_usd: float
    def __init__(self, name: _Optional[str] = ..., cap_usd: _Optional[float] = ..., spent_usd: _Optional[float] = ...) -> None: ...

class RateLimitReport(_message.Message):
    __slots__ = ("model", "headers", "seen_at_us")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    SEEN_AT_US_FIELD_NUMBER: _ClassVar[int]
    model: str
    headers: _containers.ScalarMap[str, str]
    seen_at_us: int
    def __init__(self, model: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ..., seen_at_us: _Optional[int] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "accepted", "progress", "result", "failure", "draining")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    hello: AgentHello
    accepted: TaskAccepted
    progress: TaskProgress
    result: TaskResult
    failure: TaskFailure
    draining: AgentDraining
    def __init__(self, hello: _Optional[_Union[AgentHello, _Mapping]] = ..., accepted: _Optional[_Union[TaskAccepted, _Mapping]] = ..., progress: _Optional[_Union[TaskProgress, _Mapping]] = ..., result: _Optional[_Union[TaskResult, _Mapping]] = ..., failure: _Optional[_Union[TaskFailure, _Mapping]] = ..., draining: _Optional[_Union[AgentDraining, _Mapping]] = ...) -> None: ...

class AgentHello(_message.Message):
    __slots__ = ("agent_id", "pool_id", "lease_id", "roles", "labels", "kinds", "capacity", "held_claims")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    HELD_CLAIMS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    pool_id: str
    lease_id: int
    roles: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    kinds: _containers.RepeatedScalarFieldContainer[str]
    capacity: int
    held_claims: _containers.RepeatedCompositeFieldContainer[ClaimRef]
    def __init__(self, agent_id: _Optional[str] = ..., pool_id: _Optional[str] = ..., lease_id: _Optional[int] = ..., roles: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., kinds: _Optional[_Iterable[str]] = ..., capacity: _Optional[int] = ..., held_claims: _Optional[_Iterable[_Union[ClaimRef, _Mapping]]] = ...) -> None: ...

class ClaimRef(_message.Message):
    __slots__ = ("task_id", "claim_token")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CLAIM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    claim_token: int
    def __init__(self, task_id: _Optional[str] = ..., claim_token: _Optional[int] = ...) -> None: ...

class TaskAccepted(_message.Message):
    __slots__ = ("task_id", "claim_token", "received_at_us")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CLAIM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_US_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    claim_token: int
    received_at_us: int
    def __init__(self, task_id: _Optional[str] = ..., claim_token: _Optional[int] = ..., received_at_us: _Optional[int] = ...) -> None: ...

class TaskProgress(_message.Message):
    __slots__ = ("task_id", "claim_token", "fraction", "message")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CLAIM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    claim_token: int
    fraction: float
    message: str
    def __init__(self, task_id: _Optional[str] = ..., claim_token: _Optional[int] = ..., fraction: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class TaskResult(_message.Message):
    __slots__ = ("task_id", "claim_token", "output", "usage", "received_at_us", "ratelimit")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CLAIM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_US_FIELD_NUMBER: _ClassVar[int]
    RATELIMIT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    claim_token: int
    output: bytes
    usage: _task_pb2.TokenUsage
    received_at_us: int
    ratelimit: RateLimitReport
    def __init__(self, task_id: _Optional[str] = ..., claim_token: _Optional[int] = ..., output: _Optional[bytes] = ..., usage: _Optional[_Union[_task_pb2.TokenUsage, _Mapping]] = ..., received_at_us: _Optional[int] = ..., ratelimit: _Optional[_Union[RateLimitReport, _Mapping]] = ...) -> None: ...

class TaskFailure(_message.Message):
    __slots__ = ("task_id", "claim_token", "error", "retryable", "usage", "not_started", "ratelimit")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CLAIM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    NOT_STARTED_FIELD_NUMBER: _ClassVar[int]
    RATELIMIT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    claim_token: int
    error: str
    retryable: bool
    usage: _task_pb2.TokenUsage
    not_started: bool
    ratelimit: RateLimitReport
    def __init__(self, task_id: _Optional[str] = ..., claim_token: _Optional[int] = ..., error: _Optional[str] = ..., retryable: _Optional[bool] = ..., usage: _Optional[_Union[_task_pb2.TokenUsage, _Mapping]] = ..., not_started: _Optional[bool] = ..., ratelimit: _Optional[_Union[RateLimitReport, _Mapping]] = ...) -> None: ...

class AgentDraining(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class CoordinatorMessage(_message.Message):
    __slots__ = ("welcome", "assign", "cancel", "drain", "redirect", "ack", "acks")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ASSIGN_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    REDIRECT_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    ACKS_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    assign: Assign
    cancel: CancelAssignment
    drain: Drain
    redirect: Redirect
    ack: ReportAck
    acks: _containers.RepeatedCompositeFieldContainer[ReportAck]
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., assign: _Optional[_Union[Assign, _Mapping]] = ..., cancel: _Optional[_Union[CancelAssignment, _Mapping]] = ..., drain: _Optional[_Union[Drain, _Mapping]] = ..., redirect: _Optional[_Union[Redirect, _Mapping]] = ..., ack: _Optional[_Union[ReportAck, _Mapping]] = ..., acks: _Optional[_Iterable[_Union[ReportAck, _Mapping]]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("coordinator_id", "term")
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    coordinator_id: str
    term: int
    def __init__(self, coordinator_id: _Optional[str] = ..., term: _Optional[int] = ...) -> None: ...

class Assign(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: _task_pb2.Task
    def __init__(self, task: _Optional[_Union[_task_pb2.Task, _Mapping]] = ...) -> None: ...

class CancelAssignment(_message.Message):
    __slots__ = ("task_id", "reason")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    reason: str
    def __init__(self, task_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Drain(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Redirect(_message.Message):
    __slots__ = ("leader_endpoint",)
    LEADER_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    leader_endpoint: str
    def __init__(self, leader_endpoint: _Optional[str] = ...) -> None: ...

class ReportAck(_message.Message):
    __slots__ = ("task_id", "claim_token", "accepted", "reason")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CLAIM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    claim_token: int
    accepted: bool
    reason: str
    def __init__(self, task_id: _Optional[str] = ..., claim_token: _Optional[int] = ..., accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class ReleaseClaimsRequest(_message.Message):
    __slots__ = ("agent_id", "claims", "reason", "health_term")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HEALTH_TERM_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    claims: _containers.RepeatedCompositeFieldContainer[ClaimRef]
    reason: str
    health_term: int
    def __init__(self, agent_id: _Optional[str] = ..., claims: _Optional[_Iterable[_Union[ClaimRef, _Mapping]]] = ..., reason: _Optional[str] = ..., health_term: _Optional[int] = ...) -> None: ...

class ReleaseClaimsResponse(_message.Message):
    __slots__ = ("released", "skipped")
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    released: _containers.RepeatedCompositeFieldContainer[ClaimRef]
    skipped: _containers.RepeatedCompositeFieldContainer[ClaimRef]
    def __init__(self, released: _Optional[_Iterable[_Union[ClaimRef, _Mapping]]] = ..., skipped: _Optional[_Iterable[_Union[ClaimRef, _Mapping]]] = ...) -> None: ...
