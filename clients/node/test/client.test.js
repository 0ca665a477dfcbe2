'use strict';
// MeshClient's retry and leader-following rules, against fake stubs (no sockets).

const test = require('node:test');
const assert = require('node:assert');
const grpc = require('@grpc/grpc-js');
const { MeshClient } = require('../lib/client');
const { backoffMs, leaderHint, retryable } = require('../lib/retry');
const { prefixEnd, parseEndpoints } = require('../lib/etcd');
const { taskView, bytesView } = require('../lib/format');

function grpcError(code, details, leader) {
  const err = new Error(details);
  err.code = code;
  err.details = details;
  err.metadata = new grpc.Metadata();
  if (leader) err.metadata.set('agentmesh-leader', leader);
  return err;
}

/** Fake stubs: `script[endpoint]` answers each call (an Error to fail it, else a response). */
function fakeCluster(script) {
  const calls = [];
  const factory = (endpoint) => {
    const stub = { close() {} };
    for (const method of ['Submit', 'SubmitBatch', 'GetTask', 'ListTasks', 'CancelTask', 'GetStatus']) {
      stub[method] = (request, options, callback) => {
        calls.push({ endpoint, method, request, deadline: options.deadline });
        const answer = script(endpoint, method, request);
        setImmediate(() => (answer instanceof Error ? callback(answer) : callback(null, answer)));
      };
    }
    return stub;
  };
  return { calls, factory };
}

test('a standby pointing at the leader is followed at once, and the client stays there', async () => {
  const { calls, factory } = fakeCluster((endpoint) =>
    endpoint === 'leader:1' ? { task: { task_id: 't' }, created: true } : grpcError(grpc.status.UNAVAILABLE, 'standby', 'leader:1'));
  const client = new MeshClient({ coordinator: 'standby:1', stubFactory: factory, retryMs: 1000 });
  const resp = await client.submit({ kind: 'echo', task_id: 't' });
  assert.strictEqual(resp.task.task_id, 't');
  assert.deepStrictEqual(calls.map((c) => c.endpoint), ['standby:1', 'leader:1']);
  assert.strictEqual(client.endpoint, 'leader:1');
  assert.strictEqual(client.redirects, 1);
  await client.getTask('t');
  assert.strictEqual(calls[2].endpoint, 'leader:1');
});

test('every call carries a deadline', async () => {
  const { calls, factory } = fakeCluster(() => ({}));
  const client = new MeshClient({ coordinator: 'a:1', stubFactory: factory, timeoutMs: 1234 });
  const before = Date.now();
  await client.status();
  assert.ok(calls[0].deadline >= before + 1234 && calls[0].deadline <= Date.now() + 1234);
});

test('a retried submit repeats the same idempotency key, so it cannot create two tasks', async () => {
  let n = 0;
  const { calls, factory } = fakeCluster(() => (n++ < 2 ? grpcError(grpc.status.UNAVAILABLE, 'no leader') : { results: [] }));
  const client = new MeshClient({ coordinator: 'a:1', stubFactory: factory, retryMs: 5000 });
  await client.submitBatch([{ kind: 'echo' }, { kind: 'echo', task_id: 'mine' }]);
  assert.strictEqual(calls.length, 3);
  const keys = calls.map((c) => c.request.specs[0].idempotency_key);
  assert.ok(keys[0], 'a spec without task_id gets an idempotency key');
  assert.deepStrictEqual(new Set(keys).size, 1, 'every attempt sends the same key');
  assert.strictEqual(calls[0].request.specs[1].idempotency_key, undefined, 'a task_id is enough');
});

test('codes that asking again will not change are not retried', async () => {
  for (const code of [grpc.status.INVALID_ARGUMENT, grpc.status.NOT_FOUND, grpc.status.FAILED_PRECONDITION, grpc.status.RESOURCE_EXHAUSTED, grpc.status.INTERNAL]) {
    const { calls, factory } = fakeCluster(() => grpcError(code, 'no'));
    const client = new MeshClient({ coordinator: 'a:1', stubFactory: factory });
    await assert.rejects(client.getTask('x'), (err) => err.code === code);
    assert.strictEqual(calls.length, 1, `code ${code} was retried`);
  }
});

test('retries are bounded in attempts when no leader ever answers', async () => {
  const { calls, factory } = fakeCluster(() => grpcError(grpc.status.UNAVAILABLE, 'down'));
  const client = new MeshClient({ coordinator: 'a:1,b:1', stubFactory: factory, maxAttempts: 4, retryMs: 60000 });
  await assert.rejects(client.getTask('x'), (err) => err.code === grpc.status.UNAVAILABLE);
  assert.strictEqual(calls.length, 4);
  // without etcd, an UNAVAILABLE with no pointer moves on to the next given coordinator
  assert.deepStrictEqual(calls.map((c) => c.endpoint), ['a:1', 'b:1', 'a:1', 'b:1']);
});

test('retries are bounded in time too', async () => {
  const { calls, factory } = fakeCluster(() => grpcError(grpc.status.DEADLINE_EXCEEDED, 'slow'));
  const client = new MeshClient({ coordinator: 'a:1', stubFactory: factory, maxAttempts: 1000, retryMs: 150 });
  const t0 = Date.now();
  await assert.rejects(client.getTask('x'));
  assert.ok(Date.now() - t0 < 2000);
  assert.ok(calls.length >= 2 && calls.length < 50, `${calls.length} attempts`);
});

test('backoff grows with jitter between half and all of a capped ceiling', () => {
  assert.strictEqual(backoffMs(0, { random: () => 0 }), 25);
  assert.strictEqual(backoffMs(0, { random: () => 1 }), 50);
  assert.strictEqual(backoffMs(3, { random: () => 0 }), 200);
  assert.strictEqual(backoffMs(50, { random: () => 1 }), 1000);
  assert.strictEqual(backoffMs(50, { random: () => 0 }), 500);
});

test('the leader pointer is read from the trailing metadata', () => {
  assert.strictEqual(leaderHint(grpcError(14, 'x', 'h:5')), 'h:5');
  assert.strictEqual(leaderHint(grpcError(14, 'x')), '');
  assert.strictEqual(leaderHint(new Error('plain')), '');
  assert.ok(retryable(grpcError(grpc.status.UNAVAILABLE)) && retryable(grpcError(grpc.status.DEADLINE_EXCEEDED)));
  assert.ok(!retryable(grpcError(grpc.status.CANCELLED)));
});

test('etcd helpers: prefix range end and endpoint forms', () => {
  assert.strictEqual(prefixEnd('/a/b/').toString(), '/a/b0');
  assert.deepStrictEqual([...prefixEnd(Buffer.from([0x61, 0xff]))], [0x62]);
  assert.deepStrictEqual(parseEndpoints('127.0.0.1:2379, http://h:1/'), ['http://127.0.0.1:2379', 'http://h:1']);
  assert.throws(() => parseEndpoints(''));
});

test('task views: UTF-8 bytes as text, others as base64 only, times as ISO dates', () => {
  assert.deepStrictEqual(bytesView(Buffer.from('hé')), { base64: 'aMOp', bytes: 3, text: 'hé' });
  assert.deepStrictEqual(bytesView(Buffer.from([0, 0xff])), { base64: 'AP8=', bytes: 2 });
  const v = taskView({ task_id: 't', spec: { kind: 'echo', payload: Buffer.from('x') }, state: 'TASK_STATE_SUCCEEDED', result: Buffer.from([0xc3]), created_at_us: '1700000000000000', finished_at_us: '0' });
  assert.strictEqual(v.state, 'SUCCEEDED');
  assert.strictEqual(v.result.text, undefined);
  assert.strictEqual(v.created_at, '2023-11-14T22:13:20.000Z');
  assert.strictEqual(v.finished_at, '');
});

/**
 * Fake SubmitStream calls: `script(endpoint, specs)` gets the specs a stream carried once
 * it is half-closed and returns {answer: n, error}: the first n are answered ({task,
 * created}), then the call ends with `error`, or with OK when there is none.
 */
function fakeStreams(script) {
  const streams = [];
  const EventEmitter = require('node:events');
  const factory = (endpoint) => ({
    close() {},
    SubmitStream() {
      const call = new EventEmitter();
      const specs = [];
      streams.push({ endpoint, specs });
      call.write = (msg) => specs.push(msg.spec);
      call.cancel = () => {};
      call.end = () => setImmediate(() => {
        const { answer = specs.length, error = null } = script(endpoint, specs) || {};
        for (const spec of specs.slice(0, answer)) {
          call.emit('data', { task: { task_id: spec.task_id || `by-key-${spec.idempotency_key}` }, created: true });
        }
        if (error) {
          call.emit('error', error);
          call.emit('status', { code: error.code });
        } else {
          call.emit('status', { code: grpc.status.OK });
          call.emit('end');
        }
      });
      return call;
    },
  });
  return { streams, factory };
}

test('submitStream answers in order and sends only the unanswered again, to the leader a standby names', async () => {
  const { streams, factory } = fakeStreams((endpoint) =>
    endpoint === 'leader:1' ? {} : { answer: 2, error: grpcError(grpc.status.UNAVAILABLE, 'standby', 'leader:1') });
  const client = new MeshClient({ coordinator: 'standby:1', stubFactory: factory, retryMs: 1000 });
  const specs = [{ kind: 'echo', task_id: 'a' }, { kind: 'echo' }, { kind: 'echo', task_id: 'c' }, { kind: 'echo' }];
  const answers = await client.submitStream(specs);
  assert.strictEqual(answers.length, 4);
  assert.deepStrictEqual(streams.map((s) => s.endpoint), ['standby:1', 'leader:1']);
  assert.deepStrictEqual(streams[1].specs, streams[0].specs.slice(2), 'the two unanswered, in order, with the same keys');
  assert.ok(streams[0].specs[1].idempotency_key, 'a spec without task_id gets an idempotency key');
  assert.strictEqual(answers[0].task.task_id, 'a');
  assert.strictEqual(answers[2].task.task_id, 'c');
  assert.strictEqual(client.endpoint, 'leader:1');
});

test('submitStream: INTERNAL (a write that met the end) is sent again; a refusal is not, and says what was answered', async () => {
  let n = 0;
  const internal = fakeStreams(() => (n++ === 0 ? { answer: 1, error: grpcError(grpc.status.INTERNAL, 'Internal error from Core') } : {}));
  const client = new MeshClient({ coordinator: 'a:1', stubFactory: internal.factory, retryMs: 1000 });
  assert.strictEqual((await client.submitStream([{ kind: 'echo', task_id: 'x' }, { kind: 'echo', task_id: 'y' }])).length, 2);
  assert.deepStrictEqual(internal.streams.map((s) => s.specs.map((spec) => spec.task_id)), [['x', 'y'], ['y']]);

  const refused = fakeStreams(() => ({ answer: 1, error: grpcError(grpc.status.INVALID_ARGUMENT, 'spec.kind is unknown') }));
  const strict = new MeshClient({ coordinator: 'a:1', stubFactory: refused.factory });
  await assert.rejects(strict.submitStream([{ kind: 'echo', task_id: 'ok' }, { kind: 'nope', task_id: 'bad' }]), (err) =>
    err.code === grpc.status.INVALID_ARGUMENT && err.answered.length === 1 && err.answered[0].task.task_id === 'ok');
  assert.strictEqual(refused.streams.length, 1, 'a refusal is not retried');
});

test('submitStream: a stream that ends OK with answers owed counts as broken; a silent one times out', async () => {
  let n = 0;
  const early = fakeStreams(() => (n++ === 0 ? { answer: 1 } : {}));
  const client = new MeshClient({ coordinator: 'a:1', stubFactory: early.factory, retryMs: 1000 });
  assert.strictEqual((await client.submitStream([{ kind: 'echo', task_id: 'p' }, { kind: 'echo', task_id: 'q' }])).length, 2);
  assert.strictEqual(early.streams.length, 2);

  const EventEmitter = require('node:events');
  const silent = () => ({ close() {}, SubmitStream: () => Object.assign(new EventEmitter(), { write() {}, end() {}, cancel() {} }) });
  const waiting = new MeshClient({ coordinator: 'a:1', stubFactory: silent, timeoutMs: 50, retryMs: 120, maxAttempts: 3 });
  await assert.rejects(waiting.submitStream([{ kind: 'echo', task_id: 'z' }]), (err) => err.code === grpc.status.DEADLINE_EXCEEDED);
});
