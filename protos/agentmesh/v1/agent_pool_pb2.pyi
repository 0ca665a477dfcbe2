from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGENT_STATE_UNSPECIFIED: _ClassVar[AgentState]
    AGENT_STATE_STARTING: _ClassVar[AgentState]
    AGENT_STATE_READY: _ClassVar[AgentState]
    AGENT_STATE_WARM: _ClassVar[AgentState]
    AGENT_STATE_DRAINING: _ClassVar[AgentState]
    AGENT_STATE_STOPPED: _ClassVar[AgentState]
    AGENT_STATE_RECONNECTING: _ClassVar[AgentState]
AGENT_STATE_UNSPECIFIED: AgentState
AGENT_STATE_STARTING: AgentState
AGENT_STATE_READY: AgentState
AGENT_STATE_WARM: AgentState
AGENT_STATE_DRAINING: AgentState
AGENT_STATE_STOPPED: AgentState
AGENT_STATE_RECONNECTING: AgentState

class AgentTemplate(_message.Message):
    __slots__ = ("roles", "labels", "kinds", "capacity")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ROLES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    roles: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    kinds: _containers.RepeatedScalarFieldContainer[str]
    capacity: int
    def __init__(self, roles: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., kinds: _Optional[_Iterable[str]] = ..., capacity: _Optional[int] = ...) -> None: ...

class SpawnAgentsRequest(_message.Message):
    __slots__ = ("count", "batch_size", "template", "replaces")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    REPLACES_FIELD_NUMBER: _ClassVar[int]
    count: int
    batch_size: int
    template: AgentTemplate
    replaces: str
    def __init__(self, count: _Optional[int] = ..., batch_size: _Optional[int] = ..., template: _Optional[_Union[AgentTemplate, _Mapping]] = ..., replaces: _Optional[str] = ...) -> None: ...

class SpawnAgentsResponse(_message.Message):
    __slots__ = ("agents", "elapsed_s", "from_warm")
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    FROM_WARM_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[PoolAgent]
    elapsed_s: float
    from_warm: int
    def __init__(self, agents: _Optional[_Iterable[_Union[PoolAgent, _Mapping]]] = ..., elapsed_s: _Optional[float] = ..., from_warm: _Optional[int] = ...) -> None: ...

class SpawnWavesRequest(_message.Message):
    __slots__ = ("count", "wave_size", "wave_interval_s", "template")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    WAVE_SIZE_FIELD_NUMBER: _ClassVar[int]
    WAVE_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    count: int
    wave_size: int
    wave_interval_s: float
    template: AgentTemplate
    def __init__(self, count: _Optional[int] = ..., wave_size: _Optional[int] = ..., wave_interval_s: _Optional[float] = ..., template: _Optional[_Union[AgentTemplate, _Mapping]] = ...) -> None: ...

class SpawnProgress(_message.Message):
    __slots__ = ("wave", "started", "ready", "failed", "elapsed_s")
    WAVE_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    wave: int
    started: int
    ready: int
    failed: int
    elapsed_s: float
    def __init__(self, wave: _Optional[int] = ..., started: _Optional[int] = ..., ready: _Optional[int] = ..., failed: _Optional[int] = ..., elapsed_s: _Optional[float] = ...) -> None: ...

class StopAgentsRequest(_message.Message):
    __slots__ = ("agent_ids", "count", "graceful")
    AGENT_IDS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    GRACEFUL_FIELD_NUMBER: _ClassVar[int]
    agent_ids: _containers.RepeatedScalarFieldContainer[str]
    count: int
    graceful: bool
    def __init__(self, agent_ids: _Optional[_Iterable[str]] = ..., count: _Optional[int] = ..., graceful: _Optional[bool] = ...) -> None: ...

class StopAgentsResponse(_message.Message):
    __slots__ = ("stopped",)
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    stopped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, stopped: _Optional[_Iterable[str]] = ...) -> None: ...

class ListPoolAgentsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class PoolAgent(_message.Message):
    __slots__ = ("agent_id", "pool_id", "state", "spawn_ms", "inflight", "completed", "failed", "template")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SPAWN_MS_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    pool_id: str
    state: AgentState
    spawn_ms: float
    inflight: int
    completed: int
    failed: int
    template: AgentTemplate
    def __init__(self, agent_id: _Optional[str] = ..., pool_id: _Optional[str] = ..., state: _Optional[_Union[AgentState, str]] = ..., spawn_ms: _Optional[float] = ..., inflight: _Optional[int] = ..., completed: _Optional[int] = ..., failed: _Optional[int] = ..., template: _Optional[_Union[AgentTemplate, _Mapping]] = ...) -> None: ...

class ListPoolAgentsResponse(_message.Message):
    __slots__ = ("pool_id", "agents", "warm", "next_page_token")
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    WARM_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    agents: _containers.RepeatedCompositeFieldContainer[PoolAgent]
    warm: int
    next_page_token: str
    def __init__(self, pool_id: _Optional[str] = ..., agents: _Optional[_Iterable[_Union[PoolAgent, _Mapping]]] = ..., warm: _Optional[int] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DrainPoolRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class DrainPoolResponse(_message.Message):
    __slots__ = ("draining",)
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    draining: int
    def __init__(self, draining: _Optional[int] = ...) -> None: ...
