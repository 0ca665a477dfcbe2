'use strict';
// The agent's stream bookkeeping, driven message by message with a fake call (no sockets).

const test = require('node:test');
const assert = require('node:assert');
const { Agent, toOutcome } = require('../lib/agent');

function fakeCall() {
  return { written: [], cancelled: false, write(m) { this.written.push(m); }, cancel() { this.cancelled = true; } };
}

function agentWith(handler, opts = {}) {
  // etcd is never contacted: start() is not called
  const agent = new Agent({ agentId: 'a1', kinds: ['echo'], handler, etcd: '127.0.0.1:1', acceptedAfterMs: 5, ...opts });
  const call = fakeCall();
  agent._call = call;
  agent.leaseId = '7';
  return { agent, call };
}

const task = (id, token, payload = 'p') => ({ task_id: id, claim_token: String(token), spec: { kind: 'echo', payload: Buffer.from(payload), timeout_s: 0 } });
const settle = (ms = 0) => new Promise((r) => setTimeout(r, ms));

test('a result carries the claim token and waits for the ack with that token', async () => {
  const { agent, call } = agentWith(async (t) => t.spec.payload);
  agent._onMessage({ body: 'assign', assign: { task: task('t1', 11) }, acks: [] }, call, 'c:1');
  await settle();
  const result = call.written.find((m) => m.result);
  assert.strictEqual(result.result.claim_token, '11');
  assert.strictEqual(result.result.output.toString(), 'p');
  assert.ok(agent.unacked.has('t1'));
  // an ack for another claim of the same task does not clear it
  agent._onMessage({ body: 'ack', ack: { task_id: 't1', claim_token: '10', accepted: false }, acks: [] }, call, 'c:1');
  assert.ok(agent.unacked.has('t1'));
  // acks folded into `acks` of any message count too
  agent._onMessage({ body: 'welcome', welcome: { term: '3' }, acks: [{ task_id: 't1', claim_token: '11', accepted: true }] }, call, 'c:1');
  assert.ok(!agent.unacked.has('t1'));
});

test('reports not yet acknowledged are named in the next hello', async () => {
  let release;
  const { agent, call } = agentWith((t) => (t.task_id === 'slow' ? new Promise((r) => { release = r; }) : 'done'));
  agent._onMessage({ body: 'assign', assign: { task: task('fast', 5) }, acks: [] }, call, 'c:1');
  agent._onMessage({ body: 'assign', assign: { task: task('slow', 6) }, acks: [] }, call, 'c:1');
  await settle(20);
  const hello = agent._hello();
  assert.deepStrictEqual(hello.held_claims.map((c) => [c.task_id, c.claim_token]).sort(), [['fast', '5'], ['slow', '6']]);
  assert.strictEqual(hello.lease_id, '7');
  assert.ok(call.written.some((m) => m.accepted && m.accepted.task_id === 'slow'), 'a task still running after acceptedAfterMs is announced');
  assert.ok(!call.written.some((m) => m.accepted && m.accepted.task_id === 'fast'), 'a fast task is not');
  release('x');
});

test('a cancel stops the work and nothing is reported for it', async () => {
  let seenSignal;
  const { agent, call } = agentWith((t, { signal }) => { seenSignal = signal; return new Promise(() => {}); });
  agent._onMessage({ body: 'assign', assign: { task: task('t2', 9) }, acks: [] }, call, 'c:1');
  await settle();
  agent._onMessage({ body: 'cancel', cancel: { task_id: 't2', reason: 'by client' }, acks: [] }, call, 'c:1');
  await settle(10);
  assert.ok(seenSignal.aborted);
  assert.ok(!agent.running.has('t2') && !agent.unacked.has('t2'));
  assert.ok(!call.written.some((m) => m.result || m.failure));
});

test('a handler error is a failure; retryable unless it says otherwise', async () => {
  const { agent, call } = agentWith(async (t) => {
    const err = new Error(`bad ${t.task_id}`);
    if (t.task_id === 'perm') err.retryable = false;
    throw err;
  });
  agent._onMessage({ body: 'assign', assign: { task: task('temp', 1) }, acks: [] }, call, 'c:1');
  agent._onMessage({ body: 'assign', assign: { task: task('perm', 2) }, acks: [] }, call, 'c:1');
  await settle();
  const failures = Object.fromEntries(call.written.filter((m) => m.failure).map((m) => [m.failure.task_id, m.failure]));
  assert.deepStrictEqual([failures.temp.retryable, failures.perm.retryable], [true, false]);
  assert.strictEqual(failures.perm.error, 'bad perm');
});

test('a redirect ends the stream and points the next session at the leader', () => {
  const { agent, call } = agentWith(async () => '');
  agent._onMessage({ body: 'redirect', redirect: { leader_endpoint: 'leader:9' }, acks: [] }, call, 'standby:1');
  assert.ok(call.cancelled);
  assert.strictEqual(agent._redirectTo, 'leader:9');
});

test('while draining, assignments are not taken', () => {
  const { agent, call } = agentWith(async () => '');
  agent.draining = true;
  agent._onMessage({ body: 'assign', assign: { task: task('t3', 4) }, acks: [] }, call, 'c:1');
  assert.strictEqual(agent.running.size, 0);
});

test('the fencing probe sends a forged token first and replays after the accepted ack', async () => {
  const { agent, call } = agentWith(async () => 'real', { fencingProbe: true });
  const seen = [];
  agent.on('fencing', (f) => seen.push(f));
  agent._onMessage({ body: 'assign', assign: { task: task('t4', 20) }, acks: [] }, call, 'c:1');
  await settle();
  const results = call.written.filter((m) => m.result);
  assert.deepStrictEqual(results.map((m) => m.result.claim_token), ['1000020', '20']);
  assert.strictEqual(results[0].result.output.toString(), 'FORGED');
  agent._onMessage({ body: 'ack', ack: { task_id: 't4', claim_token: '1000020', accepted: false, reason: 'stale' }, acks: [] }, call, 'c:1');
  agent._onMessage({ body: 'ack', ack: { task_id: 't4', claim_token: '20', accepted: true }, acks: [] }, call, 'c:1');
  assert.strictEqual(call.written.filter((m) => m.result).length, 3, 'the replay went out');
  agent._onMessage({ body: 'ack', ack: { task_id: 't4', claim_token: '20', accepted: false, reason: 'not in flight' }, acks: [] }, call, 'c:1');
  assert.deepStrictEqual(seen.map((f) => [f.probe, f.accepted]), [['forged', false], ['replay', false]]);
});

test('handler return values become output bytes', () => {
  assert.strictEqual(toOutcome('hé').output.toString(), 'hé');
  assert.deepStrictEqual([...toOutcome(Buffer.from([0, 255])).output], [0, 255]);
  assert.strictEqual(toOutcome(undefined).output.length, 0);
  assert.deepStrictEqual(toOutcome({ output: 'x', usage: { input_tokens: 3 } }).usage, { input_tokens: 3 });
});

test('an agent needs an id, kinds, a handler and etcd for its lease', () => {
  const ok = { agentId: 'a', kinds: ['echo'], handler: () => '', etcd: 'h:1' };
  assert.throws(() => new Agent({ ...ok, agentId: 'bad id' }));
  assert.throws(() => new Agent({ ...ok, kinds: [] }));
  assert.throws(() => new Agent({ ...ok, etcd: '' }), /lease/);
  assert.throws(() => new Agent({ ...ok, leaseTtlS: 1 }));
});
