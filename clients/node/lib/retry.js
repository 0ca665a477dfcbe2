'use strict';
// What is safe to retry, how long to wait, and where a standby says the leader is.

const { status } = require('@grpc/grpc-js');

// The trailing metadata key a standby coordinator sets on UNAVAILABLE.
const LEADER_METADATA_KEY = 'agentmesh-leader';

// UNAVAILABLE: no leader yet, a standby, a failover, etcd briefly away.
// DEADLINE_EXCEEDED: what a paused or partitioned leader looks like.
// Both are safe to repeat for every Coordinator call this client makes, because
// submits always carry a task_id or an idempotency_key (set by the client if absent),
// GetTask/ListTasks/GetStatus only read, and CancelTask is idempotent.
// Anything else (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED,
// INTERNAL) will not change by asking again and is returned to the caller.
const RETRY_CODES = new Set([status.UNAVAILABLE, status.DEADLINE_EXCEEDED]);

function retryable(err) {
  return Boolean(err) && RETRY_CODES.has(err.code);
}

/** The leader's endpoint a standby put in the trailing metadata, or ''. */
function leaderHint(err) {
  const values = err && err.metadata && typeof err.metadata.get === 'function' ? err.metadata.get(LEADER_METADATA_KEY) : [];
  return values && values.length ? String(values[0]) : '';
}

/**
 * Exponential backoff with equal jitter: attempt 0 waits 25-50 ms, doubling up to
 * 0.5-1 s. The jitter keeps hundreds of agents that lost the same leader from
 * reconnecting in one burst; the floor keeps a dead endpoint from being hammered.
 */
function backoffMs(attempt, { baseMs = 50, capMs = 1000, random = Math.random } = {}) {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 30));
  return ceiling / 2 + random() * (ceiling / 2);
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** An error shaped like a gRPC one, so callers treat it by its code. */
function unavailable(message) {
  const err = new Error(`${status.UNAVAILABLE} UNAVAILABLE: ${message}`);
  err.code = status.UNAVAILABLE;
  err.details = message;
  return err;
}

module.exports = { LEADER_METADATA_KEY, RETRY_CODES, retryable, leaderHint, backoffMs, sleep, unavailable };
