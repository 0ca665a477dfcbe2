"""The exactly-once verdict of a run, as a function of plain data (no RPCs, no clock).

While the run goes, the tracker notes which ids were acknowledged, the terminal state
the events stream (or a poll) said first for each, and which ids it saw completed twice
(`repeats_first` decides). When the run ends, the driver reads what the store holds.
`audit()` turns the two into the verdict: every acknowledged id must be in exactly one
terminal state; an id the store does not have is lost, one not terminal is unfinished,
and one completed twice (live, or a store that disagrees with the stream) is duplicated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from typing import Any

from protos.agentmesh.v1 import task_pb2 as tpb

TERMINAL = frozenset(
    {tpb.TASK_STATE_SUCCEEDED, tpb.TASK_STATE_CANCELLED, tpb.TASK_STATE_DEAD_LETTER}
)
HELD = frozenset({tpb.TASK_STATE_ASSIGNED, tpb.TASK_STATE_RUNNING})

MAX_EXAMPLES = 10
"""Unfinished tasks described in full (the ids are all listed)."""


def state_name(state: int) -> str:
    return str(tpb.TaskState.Name(state)).removeprefix("TASK_STATE_")


def repeats_first(first: int, success_tokens: Set[int], state: int, claim_token: int) -> bool:
    """Whether a second terminal record of a task only repeats what was seen first.

    The stream replays records after a resync, and a poll can read what an event
    already said: the same terminal state again is a repeat, except a SUCCEEDED under a
    claim that has not succeeded before, which means a second agent ran the task too.
    A different terminal state is never a repeat.

    Args:
        first: the terminal state seen first.
        success_tokens: the claim tokens already seen SUCCEEDED.
        state, claim_token: the new record's.
    """
    if state != first:
        return False
    return state != tpb.TASK_STATE_SUCCEEDED or claim_token in success_tokens


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """What `audit()` found. `ok` when nothing was lost, unfinished or duplicated."""

    lost: list[str]
    """Acknowledged ids the store does not have."""
    unfinished: list[str]
    """Acknowledged ids the store has, not in a terminal state."""
    duplicated: list[str]
    """Ids completed twice: seen live, or in `disagreed`."""
    disagreed: list[str]
    """Ids the stream saw end in one terminal state while the store holds another."""
    late: list[str]
    """Ids whose submit failed for the client but that reached the store all the same
    (acknowledged late: they are held to the same rule)."""
    terminal_states: dict[str, int]
    """Terminal state name → how many of the checked ids the store holds in it."""
    retries: int
    """Attempts beyond the first, summed over the terminal ids."""
    unfinished_states: dict[str, int]
    unfinished_examples: list[dict[str, Any]]

    @property
    def ok(self) -> bool:
        return not self.lost and not self.unfinished and not self.duplicated


def audit(
    *,
    acknowledged: Iterable[str],
    unacknowledged: Iterable[str] = (),
    stored: Mapping[str, tpb.Task],
    first_terminal: Mapping[str, int],
    completed_twice: Iterable[str] = (),
) -> Verdict:
    """The exactly-once verdict.

    Args:
        acknowledged: ids whose submit the coordinator acknowledged.
        unacknowledged: ids whose submit failed (a timeout may still have stored them).
        stored: id → the task as the store holds it after the run (absent: not found).
        first_terminal: id → the terminal state the run saw first (absent or 0: none).
        completed_twice: ids the run saw completed twice while it went.
    """
    expected = set(acknowledged)
    late = {t for t in set(unacknowledged) - expected if t in stored}
    lost: list[str] = []
    unfinished: list[str] = []
    disagreed: list[str] = []
    unfinished_states: dict[str, int] = {}
    examples: list[dict[str, Any]] = []
    states: dict[str, int] = {}
    retries = 0
    for tid in sorted(expected | late):
        task = stored.get(tid)
        if task is None:
            lost.append(tid)
            continue
        name = state_name(task.state)
        if task.state not in TERMINAL:
            unfinished.append(tid)
            unfinished_states[name] = unfinished_states.get(name, 0) + 1
            if len(examples) < MAX_EXAMPLES:
                examples.append(
                    {
                        "task_id": tid,
                        "state": name,
                        "agent_id": task.agent_id,
                        "attempts": task.attempts,
                        "term": task.term,
                        "last_error": task.last_error,
                    }
                )
            continue
        states[name] = states.get(name, 0) + 1
        retries += max(0, task.attempts - 1)
        seen = first_terminal.get(tid, 0)
        if seen and seen != task.state:
            disagreed.append(tid)
    return Verdict(
        lost=lost,
        unfinished=unfinished,
        duplicated=sorted(set(completed_twice) | set(disagreed)),
        disagreed=disagreed,
        late=sorted(late),
        terminal_states=states,
        retries=retries,
        unfinished_states=unfinished_states,
        unfinished_examples=examples,
    )
