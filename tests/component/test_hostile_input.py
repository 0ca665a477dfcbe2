"""Hostile input, generated: every RPC of the Coordinator, AgentPool and Consensus services gets
malformed and extreme requests (hypothesis), and undecodable bytes, over loopback to
real in-process grpc.aio servers backed by a real etcd.

Every answer must be a proper status (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED
...), never INTERNAL or UNKNOWN, never a hang, with a short message; after every case
the coordinator still answers. And one client's hostile requests must not change
another client's outcomes. The number of generated cases is printed in the summary.

The servers run on an event loop in a thread of their own, so the generated cases are
plain synchronous functions (hypothesis drives them) talking through grpc's sync client.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.agentmesh.v1 import agent_pool_pb2 as ppb
from protos.agentmesh.v1 import consensus_pb2 as kpb
from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import coordinator_pb2_grpc as cpb_grpc
from protos.agentmesh.v1 import task_pb2 as tpb
from registry.etcd_server import EtcdServer
from services.agent_pool.config import PoolConfig
from services.agent_pool.server import PoolNode
from services.consensus.config import ConsensusConfig
from services.consensus.server import ConsensusNode
from services.coordinator.config import CoordinatorConfig
from services.coordinator.server import CoordinatorNode

pytestmark = pytest.mark.timeout(300)

KiB, MiB = 1024, 1024 * 1024
FINE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
}
# a watch that was accepted stays open until the client leaves: our deadline ends it
OPEN_BY_DESIGN = {"WatchEvents", "WatchTask", "WatchDecisions"}
CLIENT_OPTIONS = [
    ("grpc.max_send_message_length", 64 * MiB),
    ("grpc.max_receive_message_length", 64 * MiB),
]
EXAMPLES = 40
MALFORMED_EXAMPLES = 25


# ---------------------------------------------------------------- servers in a thread


class Servers:
    """A coordinator, an agent pool and a consensus instance of one cluster, on an event
    loop in a thread."""

    def __init__(self, etcd_endpoint: str) -> None:
        self.etcd_endpoint = etcd_endpoint
        self.cluster = f"hostile-{uuid.uuid4().hex}"
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self.coordinator_endpoint = ""
        self.pool_endpoint = ""
        self.consensus_endpoint = ""
        self.lease_id = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="hostile-servers", daemon=True)

    def __enter__(self) -> Servers:
        self._thread.start()
        if not self.ready.wait(60):
            raise TimeoutError("the servers did not start within 60 s")
        if self.failed is not None:
            raise self.failed
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as err:  # noqa: BLE001 - reported to the test thread
            self.failed = err
            self.ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        coordinator = CoordinatorNode(
            CoordinatorConfig(
                etcd=self.etcd_endpoint, cluster=self.cluster, listen="127.0.0.1:0", grace_s=1.0
            )
        )
        pool = PoolNode(
            PoolConfig(
                etcd=self.etcd_endpoint,
                cluster=self.cluster,
                listen="127.0.0.1:0",
                sleep_ms="fixed:1",
                grace_s=1.0,
                kinds=("echo", "sleep", "noop", "fail"),
            )
        )
        consensus = ConsensusNode(
            ConsensusConfig(
                etcd=self.etcd_endpoint, cluster=self.cluster, listen="127.0.0.1:0", grace_s=1.0
            )
        )
        runs = [asyncio.ensure_future(coordinator.run()), asyncio.ensure_future(consensus.run())]
        try:
            async with asyncio.timeout(30):
                while coordinator.servicer.core is None:
                    await asyncio.sleep(0.01)
                runs.append(asyncio.ensure_future(pool.run()))
                while not pool.runner.session.id:
                    await asyncio.sleep(0.01)
                while (
                    consensus.servicer.core is None or not consensus.servicer.core.loaded.is_set()
                ):
                    await asyncio.sleep(0.01)
            self.coordinator_endpoint = coordinator.endpoint
            self.pool_endpoint = pool.endpoint
            self.consensus_endpoint = consensus.runner.endpoint
            self.lease_id = await coordinator.etcd.grant(600)  # for hand-written hellos
            self.ready.set()
            await self._stop.wait()
        finally:
            coordinator.runner.stop()
            pool.runner.stop()
            consensus.runner.stop()
            await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), 30)


@pytest.fixture(scope="module")
def servers(etcd_server: EtcdServer) -> Iterator[Servers]:
    with Servers(etcd_server.endpoint) as s:
        yield s


@pytest.fixture(scope="module")
def channels(servers: Servers) -> Iterator[dict[str, grpc.Channel]]:
    chans = {
        "Coordinator": grpc.insecure_channel(servers.coordinator_endpoint, options=CLIENT_OPTIONS),
        "AgentPool": grpc.insecure_channel(servers.pool_endpoint, options=CLIENT_OPTIONS),
        "Consensus": grpc.insecure_channel(servers.consensus_endpoint, options=CLIENT_OPTIONS),
    }
    yield chans
    for ch in chans.values():
        ch.close()


# ---------------------------------------------------------------- strategies

_SIZES = [0, 1, 5, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1023, 1024, 1025, 4097]
_HUGE = [MiB, 3 * MiB]
_CHARS = ["a", "é", "\u2603", "\x00", " ", "-"]


def _blob(n: int, c: str) -> str:
    return c * n


strings = st.one_of(
    st.text(max_size=24),
    st.builds(_blob, st.sampled_from(_SIZES), st.sampled_from(_CHARS)),
    st.builds(_blob, st.sampled_from(_HUGE), st.sampled_from(["k", "é"])),
)
ids = st.one_of(st.from_regex(r"\A[A-Za-z0-9._-]{1,12}\Z"), st.just("t-" + "0" * 126), strings)
datas = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda n: b"p" * n,
        st.sampled_from([512 * KiB - 1, 512 * KiB, 512 * KiB + 1, MiB, 3 * MiB, 9 * MiB]),
    ),
)
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, -1.0, 1e-300, 1e308, math.nan, math.inf, -math.inf]),
)
HINTS: dict[str, st.SearchStrategy[Any]] = {
    "kind": st.one_of(st.sampled_from(["echo", "sleep", "noop", "fail", "llm"]), strings),
    "count": st.sampled_from([0, 1, 2, 10_001, 2**32 - 1]),
    "batch_size": st.sampled_from([0, 1, 2, 2**32 - 1]),
    "wave_size": st.sampled_from([0, 1, 2, 3, 2**32 - 1]),
    "wave_interval_s": st.one_of(st.floats(0, 0.01), floats),
    "timeout_s": st.one_of(st.floats(0, 1), floats),
    "capacity": st.sampled_from([0, 1, 2, 1000, 1001, 2**32 - 1]),
    "page_size": st.sampled_from([0, 1, 5, 1000, 1001, 2**32 - 1]),
    "priority": st.sampled_from([0, 5, 9, 10, 2**32 - 1]),
    "max_attempts": st.sampled_from([0, 1, 100, 101, 2**32 - 1]),
    "fraction": floats,
    "graceful": st.booleans(),
    "payload": datas,
    "output": datas,
}


def _one_extreme(base: dict[str, Any], build: Callable[..., Any]) -> st.SearchStrategy[Any]:
    """A message that is valid but for one field at an extreme (so it reaches deep)."""
    extreme = st.one_of(
        st.builds(lambda v: {"role": v}, strings),
        st.builds(lambda v: {"roles": [v]}, strings),
        st.builds(lambda v: {"labels": {"l": v}}, strings),
        st.builds(lambda v: {"required_labels": {"l": v}}, strings),
        st.builds(lambda v: {"metadata": {"m": v}}, strings),
        st.builds(lambda v: {"idempotency_key": v}, strings),
        st.builds(lambda v: {"payload": v}, datas),
        st.builds(lambda v: {"timeout_s": v}, floats),
        st.builds(lambda v: {"task_id": v}, ids),
        st.builds(lambda v: {"kinds": [v]}, strings),
    )

    def make(change: dict[str, Any]) -> Any:
        try:
            return build(**{**base, **change})
        except (ValueError, TypeError):  # a field this message does not have
            return build(**base)

    return extreme.map(make)


near_valid_spec = _one_extreme({"kind": "echo", "payload": b"x"}, tpb.TaskSpec)
near_valid_template = _one_extreme({"kinds": ["echo"]}, ppb.AgentTemplate)
NEAR_VALID = {
    "agentmesh.v1.TaskSpec": near_valid_spec,
    "agentmesh.v1.AgentTemplate": near_valid_template,
}
_INTS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_cache: dict[tuple[str, int], st.SearchStrategy[Any]] = {}


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _scalar(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.name in HINTS:
        return HINTS[field.name]
    t = field.type
    if t == FieldDescriptor.TYPE_MESSAGE:
        generic = messages(field.message_type, depth + 1)
        near = NEAR_VALID.get(field.message_type.full_name)
        return generic if near is None else st.one_of(generic, near)
    if t == FieldDescriptor.TYPE_STRING:
        return ids if field.name.endswith(("_id", "page_token")) else strings
    if t == FieldDescriptor.TYPE_BYTES:
        return datas
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return floats
    if t == FieldDescriptor.TYPE_ENUM:
        return st.integers(-3, 12)
    low, high = _INTS[t]
    return st.one_of(
        st.integers(-2, 3).filter(lambda v: low <= v <= high), st.sampled_from([low, high])
    )


def _many(field: FieldDescriptor) -> st.SearchStrategy[list[Any]]:
    """A long list of small items (an item of the list strategy could be megabytes)."""
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        cls = message_factory.GetMessageClass(field.message_type)
        return st.sampled_from([17, 2001, 5000]).map(lambda n: [cls() for _ in range(n)])
    item: Any = "x" if field.type == FieldDescriptor.TYPE_STRING else 1
    return st.sampled_from([17, 33, 2001, 100_000]).map(lambda n: [item] * n)


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if _is_map(field):
        entry = field.message_type
        values = _scalar(entry.fields_by_name["value"], depth)
        big = st.sampled_from([33, 65, 1000]).map(lambda n: {f"k{i}": "v" for i in range(n)})
        return st.one_of(st.dictionaries(strings, values, max_size=3), big)
    if _repeated(field):
        return st.one_of(st.lists(_scalar(field, depth), max_size=4), _many(field))
    return _scalar(field, depth)


def _build(desc: Descriptor, values: dict[str, Any]) -> Any:
    msg = message_factory.GetMessageClass(desc)()
    for name, value in values.items():
        if value is None:
            continue
        field = desc.fields_by_name[name]
        target = getattr(msg, name, None)
        if _is_map(field):
            message_valued = field.message_type.fields_by_name["value"].message_type is not None
            for k, v in value.items():
                if message_valued:
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif _repeated(field):
            target.extend(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


def messages(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    key = (desc.full_name, depth)
    if key not in _cache:
        fields = {
            f.name: st.one_of(st.none(), _value(f, depth))
            for f in desc.fields
            if depth < 3 or f.type != FieldDescriptor.TYPE_MESSAGE
        }
        _cache[key] = st.fixed_dictionaries(fields).map(lambda v, d=desc: _build(d, v))
    return _cache[key]


def connect_messages(lease_id: int) -> st.SearchStrategy[list[Any]]:
    """An agent's stream: sometimes a hello that passes (so the rest reaches the core)."""
    hello = st.builds(
        lambda agent_id, kinds, template: cpb.AgentMessage(
            hello=cpb.AgentHello(
                agent_id=agent_id,
                lease_id=lease_id,
                kinds=kinds,
                capacity=2,
                roles=template.roles,
                labels=template.labels,
            )
        ),
        st.from_regex(r"\Ahostile-[a-z0-9]{1,8}\Z"),
        st.sampled_from([["echo"], ["echo", "sleep"], ["nothing-runs-this"]]),
        st.one_of(st.just(ppb.AgentTemplate()), near_valid_template),
    )
    rest = st.lists(messages(cpb.AgentMessage.DESCRIPTOR), max_size=4)
    return st.one_of(
        st.builds(lambda h, r: [h, *r], hello, rest),
        st.lists(messages(cpb.AgentMessage.DESCRIPTOR), min_size=1, max_size=4),
    )


# ---------------------------------------------------------------- running one case

METHODS: list[tuple[str, MethodDescriptor]] = [
    (svc.name, m)
    for svc in (
        cpb.DESCRIPTOR.services_by_name["Coordinator"],
        ppb.DESCRIPTOR.services_by_name["AgentPool"],
        kpb.DESCRIPTOR.services_by_name["Consensus"],
    )
    for m in svc.methods
]


def call(
    channel: grpc.Channel, service: str, method: MethodDescriptor, request: Any, raw: bool = False
) -> tuple[grpc.StatusCode, str]:
    """Send one request (or, with `raw`, bytes as they are); the status and its message."""
    path = f"/agentmesh.v1.{service}/{method.name}"
    serialize: Callable[[Any], bytes] | None = None if raw else (lambda m: m.SerializeToString())
    open_by_design = method.name in OPEN_BY_DESIGN
    timeout = 0.5 if open_by_design else 15.0
    try:
        if method.client_streaming:
            stub = channel.stream_stream(path, request_serializer=serialize)
            items = request if isinstance(request, list) else [request]
            for _ in stub(iter(items), timeout=timeout):
                pass
        elif method.server_streaming:
            for _ in channel.unary_stream(path, request_serializer=serialize)(
                request, timeout=timeout
            ):
                pass
        else:
            channel.unary_unary(path, request_serializer=serialize)(request, timeout=timeout)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""  # type: ignore[attr-defined]
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and open_by_design:
            return grpc.StatusCode.OK, ""
        return code, details


def check(
    channels: dict[str, grpc.Channel], service: str, method: MethodDescriptor, answer: Any
) -> None:
    code, details = answer
    assert code in FINE, f"{service}.{method.name} answered {code.name}: {details[:300]}"
    assert len(details) <= 1100, f"{service}.{method.name}: a {len(details)}-char message"
    status = cpb_grpc.CoordinatorStub(channels["Coordinator"]).GetStatus(
        cpb.GetStatusRequest(), timeout=10
    )
    assert status.leader_endpoint  # the coordinator still answers, and still leads


HYPOTHESIS = dict(
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
        HealthCheck.large_base_example,
    ],
)


@pytest.mark.parametrize(("service", "method"), METHODS, ids=[f"{s}.{m.name}" for s, m in METHODS])
def test_generated_requests_get_a_proper_answer(
    servers: Servers,
    channels: dict[str, grpc.Channel],
    hostile_cases: collections.Counter[str],
    service: str,
    method: MethodDescriptor,
) -> None:
    if method.name == "Connect":
        strategy = connect_messages(servers.lease_id)
    elif method.client_streaming:
        strategy = st.lists(messages(method.input_type), min_size=1, max_size=4)
    else:
        strategy = messages(method.input_type)

    @settings(max_examples=EXAMPLES, **HYPOTHESIS)  # type: ignore[arg-type]
    @given(request=strategy)
    def case(request: Any) -> None:
        hostile_cases[f"{service}.{method.name}"] += 1
        check(channels, service, method, call(channels[service], service, method, request))

    case()


@pytest.mark.parametrize(("service", "method"), METHODS, ids=[f"{s}.{m.name}" for s, m in METHODS])
def test_undecodable_bytes_get_invalid_argument(
    channels: dict[str, grpc.Channel],
    hostile_cases: collections.Counter[str],
    service: str,
    method: MethodDescriptor,
) -> None:
    cls = message_factory.GetMessageClass(method.input_type)

    def undecodable(raw: bytes) -> bool:
        try:
            cls.FromString(raw)
        except Exception:  # noqa: BLE001 - what the server will meet
            return True
        return False

    garbage = st.one_of(
        st.binary(min_size=1, max_size=200),
        st.builds(lambda b: b"\x0a\xff\xff\xff\xff\x0f" + b, st.binary(max_size=50)),
        st.builds(lambda b: b"\x12\x80\x80\x80\x80\x01" + b, st.binary(max_size=50)),
    ).filter(undecodable)

    @settings(max_examples=MALFORMED_EXAMPLES, **HYPOTHESIS)  # type: ignore[arg-type]
    @given(raw=garbage)
    def case(raw: bytes) -> None:
        hostile_cases[f"{service}.{method.name} (bytes)"] += 1
        request = [raw] if method.client_streaming else raw
        code, details = call(channels[service], service, method, request, raw=True)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details[:200])
        assert "not a valid message" in details
        check(channels, service, method, (code, details))

    case()


# ---------------------------------------------------------------- one client cannot hurt another


def test_a_hostile_client_does_not_change_another_clients_outcomes(
    etcd_server: EtcdServer, hostile_cases: collections.Counter[str]
) -> None:
    """A good client submits near-limit echo tasks while a hostile one floods oversized and
    undecodable requests at every RPC: every good task succeeds, none is stuck."""
    with Servers(etcd_server.endpoint) as servers:
        pool = grpc.insecure_channel(servers.pool_endpoint, options=CLIENT_OPTIONS)
        from protos.agentmesh.v1 import agent_pool_pb2_grpc as ppb_grpc

        ppb_grpc.AgentPoolStub(pool).SpawnAgents(ppb.SpawnAgentsRequest(count=8), timeout=30)
        good = grpc.insecure_channel(servers.coordinator_endpoint)  # a default client
        bad = grpc.insecure_channel(servers.coordinator_endpoint, options=CLIENT_OPTIONS)
        stop = threading.Event()
        hostile_answers: collections.Counter[str] = collections.Counter()

        def hostile() -> None:
            stub = cpb_grpc.CoordinatorStub(bad)
            huge = "x" * 3 * MiB
            attacks: list[Callable[[], Any]] = [
                lambda: stub.Submit(
                    cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo", role=huge)), timeout=10
                ),
                lambda: stub.Submit(
                    cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo", metadata={"m": huge})),
                    timeout=10,
                ),
                lambda: stub.SubmitBatch(
                    cpb.SubmitBatchRequest(
                        specs=[tpb.TaskSpec(kind="echo", payload=b"p" * 600 * KiB)] * 20
                    ),
                    timeout=10,
                ),
                lambda: stub.CancelTask(
                    cpb.CancelTaskRequest(task_id="good-0", reason=huge), timeout=10
                ),
                lambda: stub.GetTask(cpb.GetTaskRequest(task_id=huge), timeout=10),
                lambda: stub.ListTasks(
                    cpb.ListTasksRequest(view=cpb.TASK_VIEW_FULL, page_size=1000), timeout=10
                ),
                lambda: bad.unary_unary("/agentmesh.v1.Coordinator/Submit")(
                    b"\x0a\xff\xff\xff\xff\x0f", timeout=10
                ),
                lambda: bad.unary_unary("/agentmesh.v1.Coordinator/SubmitBatch")(
                    b"\x0a" * 4000, timeout=10
                ),
            ]
            i = 0
            # at least three rounds of every attack, the good client's whole run long
            while not stop.is_set() or i < 3 * len(attacks):
                try:
                    attacks[i % len(attacks)]()
                    hostile_answers["OK"] += 1
                except grpc.RpcError as err:
                    hostile_answers[err.code().name] += 1  # type: ignore[attr-defined]
                i += 1
                if i == len(attacks):
                    warmed.set()
            hostile_cases["mixed: hostile requests"] += i

        warmed = threading.Event()
        attacker = threading.Thread(target=hostile, daemon=True)
        attacker.start()
        try:
            assert warmed.wait(60), "the hostile client did not get through one round"
            stub = cpb_grpc.CoordinatorStub(good)
            payload = b"g" * 400 * KiB
            specs = [
                tpb.TaskSpec(
                    kind="echo",
                    task_id=f"good-{i}",
                    payload=payload,
                    metadata={f"k{j}": "v" * 1000 for j in range(60)},
                )
                for i in range(48)
            ]
            created = [stub.Submit(cpb.SubmitRequest(spec=s), timeout=30).created for s in specs]
            assert created == [True] * len(specs)
            deadline = time.monotonic() + 60
            states: dict[str, int] = {}
            while time.monotonic() < deadline:
                states = {
                    s.task_id: stub.GetTask(cpb.GetTaskRequest(task_id=s.task_id), timeout=10).state
                    for s in specs
                }
                if all(v == tpb.TASK_STATE_SUCCEEDED for v in states.values()):
                    break
                time.sleep(0.1)
            assert all(v == tpb.TASK_STATE_SUCCEEDED for v in states.values()), states
            task = stub.GetTask(cpb.GetTaskRequest(task_id="good-0"), timeout=10)
            assert task.result == payload
        finally:
            stop.set()
            attacker.join(60)
            for ch in (good, bad, pool):
                ch.close()
        print("hostile answers:", dict(hostile_answers))
        assert "INTERNAL" not in hostile_answers
        assert "UNKNOWN" not in hostile_answers
        assert hostile_answers["INVALID_ARGUMENT"] > 0
