'use strict';
// MeshClient: the Coordinator API with leader following and bounded retries.

const crypto = require('crypto');
const { coordinatorStub } = require('./protos');
const { EtcdGateway } = require('./etcd');
const { status } = require('@grpc/grpc-js');
const { retryable, leaderHint, backoffMs, sleep, unavailable } = require('./retry');

const TERMINAL = new Set(['TASK_STATE_SUCCEEDED', 'TASK_STATE_CANCELLED', 'TASK_STATE_DEAD_LETTER']);

/** Promise wrapper of a unary call with a deadline. */
function unary(stub, method, request, timeoutMs) {
  return new Promise((resolve, reject) => {
    stub[method](request, { deadline: Date.now() + timeoutMs }, (err, resp) => (err ? reject(err) : resolve(resp)));
  });
}

function withKey(spec) {
  // Without a task_id or idempotency_key a retried submit could create the task twice.
  if (!spec.task_id && !spec.idempotency_key) return { ...spec, idempotency_key: crypto.randomUUID() };
  return spec;
}

class MeshClient {
  /**
   * @param {object} opts
   * @param {string} [opts.coordinator] coordinator endpoints 'host:port[,host:port]', tried first.
   * @param {string} [opts.etcd] etcd endpoints; the leader is looked up there when no pointer is known.
   * @param {string} [opts.cluster] cluster name (etcd key prefix).
   * @param {number} [opts.timeoutMs] deadline of each unary call.
   * @param {number} [opts.retryMs] how long a call keeps retrying UNAVAILABLE / DEADLINE_EXCEEDED.
   * @param {number} [opts.maxAttempts] attempts per call, whatever the time.
   * @param {(msg: string, fields?: object) => void} [opts.log] diagnostics (redirects, retries).
   * @param {(endpoint: string) => object} [opts.stubFactory] for tests: builds a Coordinator stub.
   */
  constructor({ coordinator = '', etcd = '', cluster = 'default', timeoutMs = 10000, retryMs = 15000, maxAttempts = 30, log = () => {}, stubFactory = coordinatorStub } = {}) {
    this.coordinators = String(coordinator || '').split(',').map((s) => s.trim()).filter(Boolean);
    if (!this.coordinators.length && !etcd) throw new Error('give coordinator endpoints or etcd endpoints');
    this.etcd = etcd ? new EtcdGateway(etcd, { cluster }) : null;
    this.timeoutMs = timeoutMs;
    this.retryMs = retryMs;
    this.maxAttempts = maxAttempts;
    this.log = log;
    this.stubFactory = stubFactory;
    this.endpoint = '';
    this.redirects = 0;
    this.streamRetries = 0; // SubmitStream calls opened again after a break
    this._stubs = new Map();
    this._fixedIndex = 0;
    this._known = false; // whether `endpoint` is still believed to be the leader
  }

  /** The stub of the coordinator to ask now; looks the leader up when none is known. */
  async _stub() {
    if (!this._known) {
      let endpoint = '';
      if (this.coordinators.length && (!this.endpoint || !this.etcd)) {
        endpoint = this.coordinators[this._fixedIndex % this.coordinators.length];
      } else if (this.etcd) {
        endpoint = await this.etcd.leader();
      }
      if (!endpoint) throw unavailable('no coordinator leader is elected yet');
      this.endpoint = endpoint;
      this._known = true;
    }
    let stub = this._stubs.get(this.endpoint);
    if (!stub) {
      stub = this.stubFactory(this.endpoint);
      this._stubs.set(this.endpoint, stub);
    }
    return stub;
  }

  /**
   * After a retryable error: go where the standby points (returns true), or else
   * forget the endpoint so the next attempt asks etcd (or the next given coordinator).
   */
  _follow(err) {
    const hint = leaderHint(err);
    if (hint && hint !== this.endpoint) {
      this.log('following the leader', { from: this.endpoint, to: hint });
      this.endpoint = hint;
      this._known = true;
      this.redirects += 1;
      return true;
    }
    this._known = false;
    if (!this.etcd) this._fixedIndex += 1; // no etcd: try the next given coordinator
    return false;
  }

  /** One unary call with leader following and bounded retries. */
  async call(method, request) {
    const started = Date.now();
    for (let attempt = 0; ; attempt++) {
      try {
        const stub = await this._stub();
        return await unary(stub, method, request, this.timeoutMs);
      } catch (err) {
        if (!retryable(err)) throw err;
        const pointed = this._follow(err);
        if (attempt + 1 >= this.maxAttempts || Date.now() - started >= this.retryMs) throw err;
        this.log('retrying', { method, code: err.code, details: err.details, attempt: attempt + 1 });
        // a pointer to the leader is followed at once; anything else waits (a failover takes ~TTL)
        if (!pointed) await sleep(backoffMs(attempt));
      }
    }
  }

  /** Submit one TaskSpec; resolves to {task, created}. */
  submit(spec) {
    return this.call('Submit', { spec: withKey(spec) });
  }

  /** Submit up to 1,000 specs in one call; resolves to {results: [{task, created}]}. */
  submitBatch(specs) {
    return this.call('SubmitBatch', { specs: specs.map(withKey) });
  }

  /**
   * Submit specs as messages of SubmitStream calls; resolves to their answers
   * ({task, created}), in the specs' order. Each spec without a task_id gets an
   * idempotency key first. When a stream ends before every spec is answered, with
   * UNAVAILABLE or DEADLINE_EXCEEDED (a standby's pointer is followed), or with INTERNAL
   * (what a write that meets the stream's end can look like), the unanswered specs are
   * sent again, in order, on a new stream: a replay is answered with created false.
   * Retries are bounded like `call`'s. A refusal (INVALID_ARGUMENT, ...) rejects with
   * that error, whose `answered` holds the answers that came before it.
   * @param {object[]} specs
   */
  async submitStream(specs) {
    const pending = specs.map(withKey);
    const answers = [];
    const started = Date.now();
    for (let attempt = 0; ; attempt++) {
      try {
        await this._streamOnce(pending.slice(answers.length), answers);
        return answers;
      } catch (err) {
        const again = retryable(err) || err.code === status.INTERNAL;
        const pointed = again && this._follow(err);
        if (!again || attempt + 1 >= this.maxAttempts || Date.now() - started >= this.retryMs) {
          err.answered = answers.slice();
          throw err;
        }
        this.streamRetries += 1;
        this.log('stream interrupted; sending the unanswered specs again', { code: err.code, details: err.details, answered: answers.length, of: pending.length });
        if (!pointed) await sleep(backoffMs(attempt));
      }
    }
  }

  /**
   * One SubmitStream call for `specs`, pushing each answer onto `answers`. Resolves when
   * all are answered; rejects with the stream's error, or DEADLINE_EXCEEDED when no
   * answer came for `timeoutMs` while some were owed.
   */
  async _streamOnce(specs, answers) {
    const stub = await this._stub();
    await new Promise((resolve, reject) => {
      const call = stub.SubmitStream();
      let owed = specs.length;
      let timer = null;
      let done = false;
      const finish = (err) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        if (err) {
          call.cancel();
          reject(err);
        } else {
          resolve();
        }
      };
      const arm = () => {
        clearTimeout(timer);
        timer = setTimeout(() => {
          const err = new Error(`${status.DEADLINE_EXCEEDED} DEADLINE_EXCEEDED: no answer within ${this.timeoutMs} ms`);
          err.code = status.DEADLINE_EXCEEDED;
          err.details = `no answer within ${this.timeoutMs} ms`;
          finish(err);
        }, this.timeoutMs);
      };
      // an error status comes as 'error'; an OK one as 'end' (after the last answer) and
      // 'status', in either order: decide once both are in
      let ended = false;
      let ok = false;
      const settle = () => {
        if (ended && ok) finish(owed ? unavailable(`the stream ended with ${owed} request(s) unanswered`) : null);
      };
      call.on('data', (resp) => {
        if (done) return; // after a failure: the replay answers it again
        answers.push(resp);
        owed -= 1;
        arm();
      });
      call.on('error', (err) => finish(err));
      call.on('status', (st) => {
        ok = st.code === status.OK;
        settle();
      });
      call.on('end', () => {
        ended = true;
        settle();
      });
      arm();
      for (const spec of specs) call.write({ spec });
      call.end(); // half-close: the server answers what it read, then ends the call
    });
  }

  getTask(taskId) {
    return this.call('GetTask', { task_id: taskId });
  }

  cancelTask(taskId, reason = '') {
    return this.call('CancelTask', { task_id: taskId, reason });
  }

  /** One page: {tasks, next_page_token}. Filters: states, kind, agent_id, page_size, page_token. */
  listTasks(filters = {}) {
    return this.call('ListTasks', filters);
  }

  status() {
    return this.call('GetStatus', {});
  }

  listAgents() {
    return this.call('ListAgents', {});
  }

  /**
   * The task now, then every change until it is terminal (an async iterator of TaskEvents).
   * A failover ends the stream with UNAVAILABLE: the watch reopens on the new leader, and
   * since WatchTask starts with the current state, a change made meanwhile is not lost.
   * @param {string} taskId
   * @param {object} [opts]
   * @param {number} [opts.timeoutMs] overall deadline of the watch (default 5 minutes).
   */
  async *watchTask(taskId, { timeoutMs = 300000 } = {}) {
    const deadline = Date.now() + timeoutMs;
    let attempt = 0;
    while (true) {
      let call = null;
      try {
        const stub = await this._stub();
        call = stub.WatchTask({ task_id: taskId }, { deadline });
        for await (const event of call) {
          attempt = 0;
          yield event;
          if (TERMINAL.has(event.task.state)) return;
        }
        return; // the server ended the stream: the task was terminal
      } catch (err) {
        if (!retryable(err) || Date.now() >= deadline || attempt >= this.maxAttempts) throw err;
        const pointed = this._follow(err);
        this.log('watch interrupted; reopening', { task_id: taskId, code: err.code, details: err.details });
        if (!pointed) await sleep(backoffMs(attempt));
        attempt += 1;
      } finally {
        if (call) call.cancel();
      }
    }
  }

  /** Watch until terminal; resolves to the final Task. */
  async waitTerminal(taskId, opts) {
    let last = null;
    for await (const event of this.watchTask(taskId, opts)) last = event.task;
    if (!last || !TERMINAL.has(last.state)) throw new Error(`watch of ${taskId} ended before the task was terminal`);
    return last;
  }

  close() {
    for (const stub of this._stubs.values()) stub.close();
    this._stubs.clear();
  }
}

module.exports = { MeshClient, TERMINAL, unary };
