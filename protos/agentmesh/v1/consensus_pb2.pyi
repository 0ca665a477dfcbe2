from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Protocol(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROTOCOL_UNSPECIFIED: _ClassVar[Protocol]
    PROTOCOL_QUORUM: _ClassVar[Protocol]
    PROTOCOL_FAST: _ClassVar[Protocol]
    PROTOCOL_BFT: _ClassVar[Protocol]
    PROTOCOL_ORDERED: _ClassVar[Protocol]

class Choice(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHOICE_UNSPECIFIED: _ClassVar[Choice]
    CHOICE_APPROVE: _ClassVar[Choice]
    CHOICE_REJECT: _ClassVar[Choice]
    CHOICE_ABSTAIN: _ClassVar[Choice]
    CHOICE_OPTION: _ClassVar[Choice]

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_APPROVED: _ClassVar[Outcome]
    OUTCOME_REJECTED: _ClassVar[Outcome]
    OUTCOME_CHOSEN: _ClassVar[Outcome]
    OUTCOME_TIMED_OUT: _ClassVar[Outcome]
    OUTCOME_NO_QUORUM: _ClassVar[Outcome]

class Fault(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAULT_UNSPECIFIED: _ClassVar[Fault]
    FAULT_FORGED_SIGNATURE: _ClassVar[Fault]
    FAULT_UNKNOWN_AGENT: _ClassVar[Fault]
    FAULT_UNKNOWN_PROPOSAL: _ClassVar[Fault]
    FAULT_EQUIVOCATION: _ClassVar[Fault]
PROTOCOL_UNSPECIFIED: Protocol
PROTOCOL_QUORUM: Protocol
PROTOCOL_FAST: Protocol
PROTOCOL_BFT: Protocol
PROTOCOL_ORDERED: Protocol
CHOICE_UNSPECIFIED: Choice
CHOICE_APPROVE: Choice
CHOICE_REJECT: Choice
CHOICE_ABSTAIN: Choice
CHOICE_OPTION: Choice
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_APPROVED: Outcome
OUTCOME_REJECTED: Outcome
OUTCOME_CHOSEN: Outcome
OUTCOME_TIMED_OUT: Outcome
OUTCOME_NO_QUORUM: Outcome
FAULT_UNSPECIFIED: Fault
FAULT_FORGED_SIGNATURE: Fault
FAULT_UNKNOWN_AGENT: Fault
FAULT_UNKNOWN_PROPOSAL: Fault
FAULT_EQUIVOCATION: Fault

class VoterSelector(_message.Message):
    __slots__ = ("all", "role", "labels", "agents")
    ALL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    all: bool
    role: str
    labels: LabelSelector
    agents: AgentList
    def __init__(self, all: _Optional[bool] = ..., role: _Optional[str] = ..., labels: _Optional[_Union[LabelSelector, _Mapping]] = ..., agents: _Optional[_Union[AgentList, _Mapping]] = ...) -> None: ...

class LabelSelector(_message.Message):
    __slots__ = ("labels",)
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LABELS_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.ScalarMap[str, str]
    def __init__(self, labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AgentList(_message.Message):
    __slots__ = ("agent_ids",)
    AGENT_IDS_FIELD_NUMBER: _ClassVar[int]
    agent_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, agent_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ProposeRequest(_message.Message):
    __slots__ = ("proposal_id", "topic", "payload", "options", "protocol", "voters", "quorum", "timeout_s", "max_faulty", "wait", "proposer")
    PROPOSAL_ID_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    VOTERS_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_FAULTY_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    PROPOSER_FIELD_NUMBER: _ClassVar[int]
    proposal_id: str
    topic: str
    payload: bytes
    options: _containers.RepeatedScalarFieldContainer[str]
    protocol: Protocol
    voters: VoterSelector
    quorum: int
    timeout_s: float
    max_faulty: int
    wait: bool
    proposer: str
    def __init__(self, proposal_id: _Optional[str] = ..., topic: _Optional[str] = ..., payload: _Optional[bytes] = ..., options: _Optional[_Iterable[str]] = ..., protocol: _Optional[_Union[Protocol, str]] = ..., voters: _Optional[_Union[VoterSelector, _Mapping]] = ..., quorum: _Optional[int] = ..., timeout_s: _Optional[float] = ..., max_faulty: _Optional[int] = ..., wait: _Optional[bool] = ..., proposer: _Optional[str] = ...) -> None: ...

class ProposeResponse(_message.Message):
    __slots__ = ("proposal", "decision", "created")
    PROPOSAL_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    proposal: Proposal
    decision: Decision
    created: bool
    def __init__(self, proposal: _Optional[_Union[Proposal, _Mapping]] = ..., decision: _Optional[_Union[Decision, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class Proposal(_message.Message):
    __slots__ = ("proposal_id", "topic", "payload", "options", "protocol", "voters", "threshold", "max_faulty", "round", "created_at_us", "deadline_at_us", "proposer", "term", "quorum", "round1_deadline_at_us")
    PROPOSAL_ID_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    VOTERS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_FAULTY_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_US_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_AT_US_FIELD_NUMBER: _ClassVar[int]
    PROPOSER_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    ROUND1_DEADLINE_AT_US_FIELD_NUMBER: _ClassVar[int]
    proposal_id: str
    topic: str
    payload: bytes
    options: _containers.RepeatedScalarFieldContainer[str]
    protocol: Protocol
    voters: _containers.RepeatedScalarFieldContainer[str]
    threshold: int
    max_faulty: int
    round: int
    created_at_us: int
    deadline_at_us: int
    proposer: str
    term: int
    quorum: int
    round1_deadline_at_us: int
    def __init__(self, proposal_id: _Optional[str] = ..., topic: _Optional[str] = ..., payload: _Optional[bytes] = ..., options: _Optional[_Iterable[str]] = ..., protocol: _Optional[_Union[Protocol, str]] = ..., voters: _Optional[_Iterable[str]] = ..., threshold: _Optional[int] = ..., max_faulty: _Optional[int] = ..., round: _Optional[int] = ..., created_at_us: _Optional[int] = ..., deadline_at_us: _Optional[int] = ..., proposer: _Optional[str] = ..., term: _Optional[int] = ..., quorum: _Optional[int] = ..., round1_deadline_at_us: _Optional[int] = ...) -> None: ...

class Vote(_message.Message):
    __slots__ = ("proposal_id", "agent_id", "round", "choice", "option", "reason", "signature", "received_at_us")
    PROPOSAL_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    OPTION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_US_FIELD_NUMBER: _ClassVar[int]
    proposal_id: str
    agent_id: str
    round: int
    choice: Choice
    option: str
    reason: str
    signature: bytes
    received_at_us: int
    def __init__(self, proposal_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., round: _Optional[int] = ..., choice: _Optional[_Union[Choice, str]] = ..., option: _Optional[str] = ..., reason: _Optional[str] = ..., signature: _Optional[bytes] = ..., received_at_us: _Optional[int] = ...) -> None: ...

class Exclusion(_message.Message):
    __slots__ = ("agent_id", "fault", "detail", "proposal_id", "round", "at_us")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    FAULT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    AT_US_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    fault: Fault
    detail: str
    proposal_id: str
    round: int
    at_us: int
    def __init__(self, agent_id: _Optional[str] = ..., fault: _Optional[_Union[Fault, str]] = ..., detail: _Optional[str] = ..., proposal_id: _Optional[str] = ..., round: _Optional[int] = ..., at_us: _Optional[int] = ...) -> None: ...

class VoteRecord(_message.Message):
    __slots__ = ("proposal_id", "agent_id", "votes", "excluded", "conflicting")
    PROPOSAL_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    VOTES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    CONFLICTING_FIELD_NUMBER: _ClassVar[int]
    proposal_id: str
    agent_id: str
    votes: _containers.RepeatedCompositeFieldContainer[Vote]
    excluded: Exclusion
    conflicting: Vote
    def __init__(self, proposal_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., votes: _Optional[_Iterable[_Union[Vote, _Mapping]]] = ..., excluded: _Optional[_Union[Exclusion, _Mapping]] = ..., conflicting: _Optional[_Union[Vote, _Mapping]] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("proposal_id", "outcome", "option", "protocol", "topic", "round", "eligible", "threshold", "votes_counted", "participation", "tally", "excluded", "created_at_us", "decided_at_us", "latency_ms", "term", "revision", "sequence", "winning_votes")
    class TallyEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PROPOSAL_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    OPTION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ELIGIBLE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    VOTES_COUNTED_FIELD_NUMBER: _ClassVar[int]
    PARTICIPATION_FIELD_NUMBER: _ClassVar[int]
    TALLY_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_US_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_US_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    WINNING_VOTES_FIELD_NUMBER: _ClassVar[int]
    proposal_id: str
    outcome: Outcome
    option: str
    protocol: Protocol
    topic: str
    round: int
    eligible: int
    threshold: int
    votes_counted: int
    participation: float
    tally: _containers.ScalarMap[str, int]
    excluded: _containers.RepeatedCompositeFieldContainer[Exclusion]
    created_at_us: int
    decided_at_us: int
    latency_ms: float
    term: int
    revision: int
    sequence: int
    winning_votes: _containers.RepeatedCompositeFieldContainer[Vote]
    def __init__(self, proposal_id: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., option: _Optional[str] = ..., protocol: _Optional[_Union[Protocol, str]] = ..., topic: _Optional[str] = ..., round: _Optional[int] = ..., eligible: _Optional[int] = ..., threshold: _Optional[int] = ..., votes_counted: _Optional[int] = ..., participation: _Optional[float] = ..., tally: _Optional[_Mapping[str, int]] = ..., excluded: _Optional[_Iterable[_Union[Exclusion, _Mapping]]] = ..., created_at_us: _Optional[int] = ..., decided_at_us: _Optional[int] = ..., latency_ms: _Optional[float] = ..., term: _Optional[int] = ..., revision: _Optional[int] = ..., sequence: _Optional[int] = ..., winning_votes: _Optional[_Iterable[_Union[Vote, _Mapping]]] = ...) -> None: ...

class GetDecisionRequest(_message.Message):
    __slots__ = ("proposal_id",)
    PROPOSAL_ID_FIELD_NUMBER: _ClassVar[int]
    proposal_id: str
    def __init__(self, proposal_id: _Optional[str] = ...) -> None: ...

class ListDecisionsRequest(_message.Message):
    __slots__ = ("protocol", "page_size", "page_token")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    protocol: Protocol
    page_size: int
    page_token: str
    def __init__(self, protocol: _Optional[_Union[Protocol, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDecisionsResponse(_message.Message):
    __slots__ = ("decisions", "next_page_token")
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    decisions: _containers.RepeatedCompositeFieldContainer[Decision]
    next_page_token: str
    def __init__(self, decisions: _Optional[_Iterable[_Union[Decision, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchDecisionsRequest(_message.Message):
    __slots__ = ("protocol", "after_revision")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    AFTER_REVISION_FIELD_NUMBER: _ClassVar[int]
    protocol: Protocol
    after_revision: int
    def __init__(self, protocol: _Optional[_Union[Protocol, str]] = ..., after_revision: _Optional[int] = ...) -> None: ...

class GetConsensusStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ConsensusStatus(_message.Message):
    __slots__ = ("leader_id", "leader_endpoint", "term", "voters", "open_proposals", "recent_faults")
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    LEADER_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    VOTERS_FIELD_NUMBER: _ClassVar[int]
    OPEN_PROPOSALS_FIELD_NUMBER: _ClassVar[int]
    RECENT_FAULTS_FIELD_NUMBER: _ClassVar[int]
    leader_id: str
    leader_endpoint: str
    term: int
    voters: _containers.RepeatedScalarFieldContainer[str]
    open_proposals: int
    recent_faults: _containers.RepeatedCompositeFieldContainer[Exclusion]
    def __init__(self, leader_id: _Optional[str] = ..., leader_endpoint: _Optional[str] = ..., term: _Optional[int] = ..., voters: _Optional[_Iterable[str]] = ..., open_proposals: _Optional[int] = ..., recent_faults: _Optional[_Iterable[_Union[Exclusion, _Mapping]]] = ...) -> None: ...

class VoterMessage(_message.Message):
    __slots__ = ("hello", "vote")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    VOTE_FIELD_NUMBER: _ClassVar[int]
    hello: VoterHello
    vote: Vote
    def __init__(self, hello: _Optional[_Union[VoterHello, _Mapping]] = ..., vote: _Optional[_Union[Vote, _Mapping]] = ...) -> None: ...

class VoterHello(_message.Message):
    __slots__ = ("agent_id", "pool_id", "roles", "labels")
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
    agent_id: str
    pool_id: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    def __init__(self, agent_id: _Optional[str] = ..., pool_id: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ConsensusMessage(_message.Message):
    __slots__ = ("welcome", "request", "rejected")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    welcome: VoterWelcome
    request: VoteRequest
    rejected: VoteRejected
    def __init__(self, welcome: _Optional[_Union[VoterWelcome, _Mapping]] = ..., request: _Optional[_Union[VoteRequest, _Mapping]] = ..., rejected: _Optional[_Union[VoteRejected, _Mapping]] = ...) -> None: ...

class VoterWelcome(_message.Message):
    __slots__ = ("instance_id", "term")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    term: int
    def __init__(self, instance_id: _Optional[str] = ..., term: _Optional[int] = ...) -> None: ...

class VoteRequest(_message.Message):
    __slots__ = ("proposal", "round", "previous_tally")
    class PreviousTallyEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PROPOSAL_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_TALLY_FIELD_NUMBER: _ClassVar[int]
    proposal: Proposal
    round: int
    previous_tally: _containers.ScalarMap[str, int]
    def __init__(self, proposal: _Optional[_Union[Proposal, _Mapping]] = ..., round: _Optional[int] = ..., previous_tally: _Optional[_Mapping[str, int]] = ...) -> None: ...

class VoteRejected(_message.Message):
    __slots__ = ("proposal_id", "round", "fault", "reason")
    PROPOSAL_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FAULT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    proposal_id: str
    round: int
    fault: Fault
    reason: str
    def __init__(self, proposal_id: _Optional[str] = ..., round: _Optional[int] = ..., fault: _Optional[_Union[Fault, str]] = ..., reason: _Optional[str] = ...) -> None: ...
