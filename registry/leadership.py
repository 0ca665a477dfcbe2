"""One leadership loop for every elected service: an async iterator of terms.

In the spirit of etcd's `concurrency.Election` on a `Session`: campaign on the
session's lease, yield a `Term` when elected, end it when the election key or the
lease goes, resign, and campaign again. Each term carries its fence (the election
key's create revision), so everything the leader writes is refused once the term
is over.

A leader whose terms keep failing fast (a load that cannot finish, an etcd that
refuses its writes) backs off with growing, jittered delays instead of churning
terms, and says so through `on_failing` (the runner turns that into NOT_SERVING).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from registry.election import Election
from registry.errors import NotLeaderError, RegistryError, StoreUnavailableError
from registry.etcd import TxnResponse
from registry.lease import Session

log = logging.getLogger(__name__)

T = TypeVar("T")

# A term shorter than this counts as a failure for the backoff: long enough that a
# load which fails at once is noticed, short enough that a leader deposed by a real
# failover after serving a while campaigns again at once.
STABLE_TERM_S = 5.0
BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 10.0


def leader_value(node_id: str, endpoint: str) -> bytes:
    """What a leader publishes under its election key: "<node id> <endpoint>"."""
    return f"{node_id} {endpoint}".encode()


def parse_leader_value(raw: bytes) -> tuple[str, str]:
    """(node id, endpoint) from an election key's value."""
    node, _, endpoint = bytes(raw).decode(errors="replace").partition(" ")
    return node, endpoint


async def _reap(*tasks: asyncio.Future[Any]) -> None:
    """Cancel `tasks` and wait until they are done, without swallowing a cancellation
    of the caller (`suppress(BaseException)` around an await would) and without
    leaving their exceptions unretrieved."""
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled():
            task.exception()


class TermEndedError(NotLeaderError):
    """The term ended (election key or session lease gone) while work was under way."""


@dataclass(eq=False)
class Term:
    """One term of leadership. `number` is the fence: the election key's create revision."""

    number: int
    election: Election
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    failed: BaseException | None = None
    """Set by the holder when the term ended in an error (counts for the backoff)."""

    async def fenced(self, request: Any, timeout_s: float | None = None) -> TxnResponse:
        """A TxnRequest applied only while this term holds (NotLeaderError after)."""
        return await self.election.fenced_request(request, timeout_s)

    async def hold(self, work: Awaitable[T]) -> T:
        """Run `work` for as long as the term lasts; TermEndedError if the term ends first."""
        job = asyncio.ensure_future(work)
        ended = asyncio.ensure_future(self.ended.wait())
        try:
            await asyncio.wait({job, ended}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # we were cancelled: so is the work
            await _reap(job, ended)
            raise
        ended.cancel()
        if not job.done():
            await _reap(job)
            raise TermEndedError(f"term {self.number} ended")
        return job.result()


class Leadership:
    """Campaigns for `role` on `session`, one term at a time, forever.

    Args:
        session: the process's session (its lease carries the candidacy).
        role: election name; keys live under election/<role>/.
        value: what the leader publishes (see `leader_value`).
        on_failing: called with True when terms keep failing fast, False when one holds.
        rng: jitter source (tests pass a seeded one).
    """

    def __init__(
        self,
        session: Session,
        role: str,
        value: bytes,
        *,
        on_failing: Callable[[bool], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        self.session = session
        self.role = role
        self.value = value
        self.on_failing = on_failing
        self.rng = rng or random.Random()
        loop_time = asyncio.get_running_loop().time if monotonic is None else monotonic
        self.monotonic = loop_time
        self.failures = 0
        self.term: Term | None = None

    async def _set_failing(self, failing: bool) -> None:
        if self.on_failing is not None:
            with contextlib.suppress(Exception):
                await self.on_failing(failing)

    async def _campaign(self) -> Term | None:
        """One candidacy on the current lease: a Term, or None if the lease went first."""
        lease_id = await self.session.wait_ready()
        lost = self.session.lost
        election = Election(self.session.etcd, self.role, lease_id, self.value)
        campaign = asyncio.ensure_future(election.campaign())
        gone = asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait({campaign, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not campaign.done():
                await _reap(campaign)
        if campaign.cancelled():
            return None
        number = campaign.result()  # raises what the campaign raised
        return Term(number, election)

    async def _watch_end(self, term: Term) -> None:
        """Set `term.ended` when the election key is deleted or the lease is lost; and
        once the term has held for STABLE_TERM_S, clear the failing state."""
        lost = self.session.lost
        key_gone = asyncio.ensure_future(term.election.wait_lost())
        lease_gone = asyncio.ensure_future(lost.wait())
        either = {key_gone, lease_gone}
        try:
            done, _ = await asyncio.wait(
                either, timeout=STABLE_TERM_S, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                if self.failures:
                    self.failures = 0
                    await self._set_failing(False)
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _reap(key_gone, lease_gone)
            term.ended.set()

    async def terms(self) -> AsyncGenerator[Term, None]:
        """Yield each term as it begins. The caller leads inside the loop body (use
        `term.hold(...)` so its work stops when the term ends); leaving the body ends
        the term (the key is resigned) and the next campaign starts."""
        while True:
            started = self.monotonic()
            try:
                term = await self._campaign()
            except (StoreUnavailableError, NotLeaderError) as err:
                log.warning("campaign failed", extra={"role": self.role, "error": str(err)})
                await self._after(started, err)
                continue
            if term is None:
                continue  # the lease went while campaigning: the session takes a new one
            watcher = asyncio.ensure_future(self._watch_end(term))
            self.term = term
            try:
                yield term
            finally:
                self.term = None
                term.ended.set()
                await _reap(watcher)
                # asyncio.timeout: 3.11's wait_for swallows a cancel that comes as the
                # resign finishes, and the loop would campaign on after shutdown began
                with contextlib.suppress(RegistryError, TimeoutError):
                    async with asyncio.timeout(1.0):
                        await term.election.resign()
            await self._after(started, term.failed)

    async def _after(self, started: float, error: BaseException | None) -> None:
        """Back off after a term or campaign that failed, or lasted less than STABLE_TERM_S."""
        if error is None and self.monotonic() - started >= STABLE_TERM_S:
            return  # a term that held: `_watch_end` has cleared the failing state
        self.failures += 1
        if self.failures >= 3:
            await self._set_failing(True)
            if self.failures == 3 or self.failures % 10 == 0:
                log.error(
                    "leadership keeps failing; backing off",
                    extra={
                        "role": self.role,
                        "failures": self.failures,
                        "error": repr(error) if error else "term ended within seconds",
                    },
                )
        ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (self.failures - 1))
        await self.session.clock.sleep(ceiling / 2 + self.rng.uniform(0, ceiling / 2))

    async def serve(self, lead: Callable[[Term], Awaitable[None]]) -> None:
        """Run `lead(term)` for every term until cancelled. An error in `lead` ends that
        term and counts toward the backoff; it never stops the campaigning."""
        async with contextlib.aclosing(self.terms()) as terms:
            async for term in terms:
                await self._hold(term, lead)

    async def _hold(self, term: Term, lead: Callable[[Term], Awaitable[None]]) -> None:
        try:
            await term.hold(lead(term))
        except TermEndedError:
            log.info("term ended", extra={"role": self.role, "term": term.number})
        except (StoreUnavailableError, NotLeaderError) as err:
            term.failed = err
            log.warning(
                "term ended", extra={"role": self.role, "term": term.number, "error": str(err)}
            )
        except Exception as err:  # a bug must not leave a replica that never campaigns
            term.failed = err
            log.exception("leading failed", extra={"role": self.role, "term": term.number})
