'use strict';
// Tasks as plain JSON for people and scripts: bytes as text when they are UTF-8 (and
// always as base64), times as ISO dates, states without the TASK_STATE_ prefix.

function bytesView(buf) {
  const b = Buffer.from(buf || []);
  const out = { base64: b.toString('base64'), bytes: b.length };
  try {
    out.text = new TextDecoder('utf-8', { fatal: true }).decode(b);
  } catch (err) {
    // not UTF-8: base64 only
  }
  return out;
}

function isoFromUs(us) {
  const n = Number(us || 0);
  return n ? new Date(n / 1000).toISOString() : '';
}

const state = (s) => String(s || '').replace(/^TASK_STATE_/, '');

function taskView(t) {
  return {
    task_id: t.task_id,
    kind: t.spec ? t.spec.kind : '',
    state: state(t.state),
    attempts: t.attempts,
    agent_id: t.agent_id,
    claim_token: t.claim_token,
    payload: bytesView(t.spec && t.spec.payload),
    result: bytesView(t.result),
    last_error: t.last_error,
    created_at: isoFromUs(t.created_at_us),
    finished_at: isoFromUs(t.finished_at_us),
    term: t.term,
  };
}

module.exports = { bytesView, taskView, state, isoFromUs };
