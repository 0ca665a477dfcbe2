"""Finished-task counts that outlive a leader.

The leader counts the tasks it finishes (`CoordinatorCore.finished`, by terminal
state) in memory; GetStatus adds them to the open tasks it holds. Without more, a new
leader would start again from zero, and the status view and the dashboard would forget
every finished task at each failover or restart.

So the leader keeps the running totals in one etcd key, `stats/finished` (JSON: state
name → count): read at the start of each term as the base its own count adds to, and
written back, fenced by the term, at most once a second while they change and once
more when the term ends. One small write a second, never one per task: the hot path
stays three etcd writes per task. A leader that crashes loses at most its last
second of counts (an undercount, never a double count: only the fenced leader writes).
"""

from __future__ import annotations

import collections
import json
import logging

from registry.election import Election
from registry.errors import NotLeaderError, StoreRefusedError, StoreUnavailableError
from registry.etcd import Etcd, op_put
from services._common.clock import Clock

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0
# a key this large is not ours to trust (states are a handful of short names)
MAX_VALUE_BYTES = 4096


def key(etcd: Etcd) -> bytes:
    return etcd.key("stats", "finished")


def decode(value: bytes) -> collections.Counter[str]:
    """The stored totals; a value that is not a JSON object of counts starts from zero."""
    counts: collections.Counter[str] = collections.Counter()
    if not value or len(value) > MAX_VALUE_BYTES:
        return counts
    try:
        doc = json.loads(value)
    except ValueError:
        return counts
    if isinstance(doc, dict):
        for state, n in doc.items():
            if isinstance(state, str) and isinstance(n, int) and n > 0:
                counts[state] = n
    return counts


def encode(counts: collections.Counter[str]) -> bytes:
    return json.dumps(dict(sorted(counts.items())), separators=(",", ":")).encode()


async def load(etcd: Etcd) -> collections.Counter[str]:
    """The totals the previous leaders left (the new term's base)."""
    kv = await etcd.get(key(etcd))
    return decode(kv.value) if kv is not None else collections.Counter()


async def save(
    etcd: Etcd, election: Election, counts: collections.Counter[str], timeout_s: float = 2.0
) -> None:
    await election.fenced([op_put(key(etcd), encode(counts))], timeout_s=timeout_s)


async def keep(
    etcd: Etcd,
    election: Election,
    clock: Clock,
    finished: collections.Counter[str],
    interval_s: float = FLUSH_INTERVAL_S,
) -> None:
    """Write `finished` (the core's live counter) back whenever it changed, until
    cancelled. An etcd outage only delays the write; losing the term ends the loop."""
    written = dict(finished)
    while True:
        await clock.sleep(interval_s)
        now = dict(finished)
        if now == written:
            continue
        try:
            await save(etcd, election, collections.Counter(now))
        except StoreUnavailableError:
            continue  # etcd is away: the next tick writes the newer totals
        except StoreRefusedError as err:  # not worth ending the term over (a raise would)
            # as for llm costs: written again when the totals next change
            log.warning("finished counts refused by etcd", extra={"error": str(err)[:200]})
        except NotLeaderError:
            return
        written = now


async def save_last(etcd: Etcd, election: Election, finished: collections.Counter[str]) -> None:
    """At the end of a term: write what is left, if the term still holds (best effort,
    briefly: a term that ended with etcd away must not hold up the next campaign)."""
    try:
        await save(etcd, election, finished, timeout_s=0.5)
    except (NotLeaderError, StoreUnavailableError) as err:
        log.info("finished counts not saved at step-down", extra={"error": str(err)})
