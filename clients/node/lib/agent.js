'use strict';
// Agent: one Coordinator.Connect stream, the etcd lease its claims live on, and the
// bookkeeping that makes reports survive a reconnect. The protocol, in order:
//   agent → hello (agent_id, lease_id, kinds, capacity, held_claims) — always first
//   coordinator → welcome (term) | redirect + UNAVAILABLE (a standby)
//   coordinator → assign (task with claim_token)
//   agent → accepted (only for work still running after 20 ms), progress, then
//           result or failure, each with the task's claim_token
//   coordinator → ack (accepted or refused, with a reason), also folded into `acks`
//   coordinator → cancel (drop the task, report nothing), drain, redirect
// A report stays "unacked" until the coordinator acknowledges it with the same claim
// token, and is sent again (after a hello that lists it in held_claims) on the next
// stream, so a failover between the work and its report loses nothing.

const { EventEmitter } = require('events');
const { coordinatorStub } = require('./protos');
const { EtcdGateway } = require('./etcd');
const { leaderHint, backoffMs } = require('./retry');

const ID_RE = /^[A-Za-z0-9._-]{1,128}$/;

/** A handler's return value → TaskResult.output and usage. */
function toOutcome(value) {
  if (value === undefined || value === null) return { output: Buffer.alloc(0), usage: {} };
  if (Buffer.isBuffer(value) || value instanceof Uint8Array) return { output: Buffer.from(value), usage: {} };
  if (typeof value === 'string') return { output: Buffer.from(value, 'utf8'), usage: {} };
  if (typeof value === 'object' && 'output' in value) {
    return { output: toOutcome(value.output).output, usage: value.usage || {} };
  }
  return { output: Buffer.from(JSON.stringify(value), 'utf8'), usage: {} };
}

function rejectOnAbort(signal) {
  return new Promise((_, reject) => {
    if (signal.aborted) reject(signal.reason);
    else signal.addEventListener('abort', () => reject(signal.reason), { once: true });
  });
}

class TimeoutError extends Error {}

/**
 * Events: 'welcome' {coordinator_id, term, endpoint}, 'assign' (Task), 'report' (the
 * message sent), 'ack' {task_id, claim_token, accepted, reason}, 'fencing' (the answer
 * to a fencing probe), 'cancel' {task_id, reason}, 'redirect' {leader_endpoint},
 * 'drain' {reason}, 'disconnect' {endpoint, code, details}, 'lease' {lease_id},
 * 'drained' (draining, and everything held is reported and acknowledged).
 */
class Agent extends EventEmitter {
  /**
   * @param {object} opts
   * @param {string} opts.agentId unique in the cluster ([A-Za-z0-9._-], at most 128).
   * @param {string[]} opts.kinds task kinds this agent runs.
   * @param {(task: object, ctx: {signal: AbortSignal, progress: Function}) => Promise<any>} opts.handler
   *   runs one task; resolves to a Buffer, a string or {output, usage}; a thrown error fails
   *   the attempt (set `err.retryable = false` to send it straight to DEAD_LETTER).
   * @param {string} opts.etcd etcd endpoints: the agent's lease is granted there (required).
   * @param {string} [opts.coordinator] coordinator endpoints to try first (else etcd names the leader).
   * @param {string} [opts.cluster] cluster name.
   * @param {string} [opts.poolId] reported in hello (groups agents in status views).
   * @param {string[]} [opts.roles] @param {object} [opts.labels] @param {number} [opts.capacity]
   * @param {number} [opts.leaseTtlS] lease TTL; claims (and so the tasks) are freed this long
   *   after the process dies without its stream being seen to drop.
   * @param {number} [opts.taskTimeoutS] per-attempt limit when the task sets none.
   * @param {boolean} [opts.fencingProbe] for tests and demos: before each real result send
   *   one with a forged claim token, and after it is accepted replay it; both must be refused.
   * @param {(msg: string, fields?: object) => void} [opts.log]
   */
  constructor({
    agentId, kinds, handler, etcd, coordinator = '', cluster = 'default', poolId = 'node',
    roles = [], labels = {}, capacity = 1, leaseTtlS = 5, taskTimeoutS = 300,
    acceptedAfterMs = 20, fencingProbe = false, log = () => {}, stubFactory = coordinatorStub,
  }) {
    super();
    if (!ID_RE.test(agentId || '')) throw new Error('agentId is required: 1-128 characters of A-Z a-z 0-9 . _ -');
    if (!kinds || !kinds.length) throw new Error('kinds must name at least one task kind');
    if (typeof handler !== 'function') throw new Error('handler must be a function');
    if (!(capacity >= 1 && capacity <= 1000)) throw new Error('capacity must be 1-1000');
    if (!(leaseTtlS >= 2)) throw new Error("leaseTtlS must be at least 2 (etcd's minimum)");
    if (!etcd) throw new Error('etcd endpoints are required: the agent needs a live etcd lease for its claims');
    Object.assign(this, { agentId, kinds, handler, poolId, roles, labels, capacity, leaseTtlS, taskTimeoutS, acceptedAfterMs, fencingProbe, log, stubFactory });
    this.etcd = new EtcdGateway(etcd, { cluster });
    this.coordinators = String(coordinator || '').split(',').map((s) => s.trim()).filter(Boolean);
    this.leaseId = '';
    this.term = '';
    this.endpoint = '';
    this.running = new Map(); // task_id → {token, abort, timer}
    this.unacked = new Map(); // task_id → the result/failure message, until acked
    this.draining = false;
    this.stopping = false;
    this._call = null;
    this._redirectTo = '';
    this._useGiven = true;
    this._given = 0;
    this._stubs = new Map();
    this._probes = new Map(); // `${task_id}/${token}` → 'forged' | 'replay'
    this._wakers = new Set();
    this._loop = null;
    this._ready = new Promise((resolve) => this.once('welcome', resolve));
    this._ready.catch(() => {});
  }

  /** Grant the lease, register, and connect (in the background). Resolves once started. */
  async start() {
    await this._renewLease();
    this._loop = this._run();
    this._keeper = this._keepAliveLoop();
    return this;
  }

  /** Resolves at the first welcome (with {coordinator_id, term, endpoint}). */
  ready() {
    return this._ready;
  }

  async _renewLease() {
    this.leaseId = await this.etcd.grant(this.leaseTtlS);
    // the same registration a Python pool writes for its agents, on the agent's lease
    const info = { pool: this.poolId, kinds: this.kinds, roles: this.roles };
    await this.etcd.put(`agents/${this.agentId}`, JSON.stringify(info), this.leaseId);
    this.emit('lease', { lease_id: this.leaseId });
  }

  /**
   * Refresh the lease every TTL/3 (as etcd's own clients do). An unreachable etcd is not a
   * lost lease (etcd restores leases when it restarts); a TTL of 0 is: take a new lease and
   * reconnect, because every claim on the old one is gone. The same tick asks etcd who
   * leads, so a leader that is paused (its stream open but silent) is left for the new one.
   */
  async _keepAliveLoop() {
    while (!this.stopping) {
      await this._sleep((this.leaseTtlS * 1000) / 3);
      if (this.stopping) return;
      try {
        const ttl = await this.etcd.keepAlive(this.leaseId);
        if (ttl <= 0) {
          this.log('the etcd lease is gone; taking a new one and reconnecting', { lease_id: this.leaseId });
          await this._renewLease();
          if (this._call) this._call.cancel();
          continue;
        }
        const leader = await this.etcd.leader();
        if (leader && this._call && this.endpoint && leader !== this.endpoint) {
          this.log('etcd names another leader; moving', { from: this.endpoint, to: leader });
          this._redirectTo = leader;
          this._call.cancel();
        }
      } catch (err) {
        this.log('lease refresh failed; retrying', { error: err.message });
      }
    }
  }

  /** A wait that stop() cuts short. */
  _sleep(ms) {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this._wakers.delete(done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      this._wakers.add(done);
    });
  }

  _wakeAll() {
    for (const wake of [...this._wakers]) wake();
  }

  async _leaderEndpoint() {
    if (this._useGiven && this.coordinators.length) {
      this._useGiven = false;
      return this.coordinators[this._given++ % this.coordinators.length];
    }
    try {
      const leader = await this.etcd.leader();
      if (leader) return leader;
    } catch (err) {
      this.log('cannot ask etcd for the leader', { error: err.message });
    }
    return this.coordinators.length ? this.coordinators[this._given++ % this.coordinators.length] : '';
  }

  async _run() {
    let attempt = 0;
    while (!this.stopping) {
      let welcomed = false;
      try {
        const endpoint = this._redirectTo || (await this._leaderEndpoint());
        this._redirectTo = '';
        if (endpoint && !this.stopping) welcomed = await this._session(endpoint);
      } catch (err) {
        // never let one bad session end the agent: log it and connect again after a backoff
        this.log('session failed', { error: err.message });
      }
      if (this.stopping) return;
      if (welcomed) attempt = 0;
      if (this._redirectTo) continue; // a pointer to the leader: go at once
      await this._sleep(backoffMs(attempt++));
    }
  }

  _stubFor(endpoint) {
    let stub = this._stubs.get(endpoint);
    if (!stub) {
      stub = this.stubFactory(endpoint);
      this._stubs.set(endpoint, stub);
    }
    return stub;
  }

  _hello() {
    const held = [];
    for (const [task_id, r] of this.running) held.push({ task_id, claim_token: r.token });
    for (const [task_id, msg] of this.unacked) held.push({ task_id, claim_token: (msg.result || msg.failure).claim_token });
    return {
      agent_id: this.agentId,
      pool_id: this.poolId,
      lease_id: this.leaseId,
      roles: this.roles,
      labels: this.labels,
      kinds: this.kinds,
      capacity: this.capacity,
      held_claims: held,
    };
  }

  /** One stream; resolves (true if it was welcomed) when it ends, however it ends. */
  _session(endpoint) {
    return new Promise((resolve) => {
      // no deadline: the stream lives as long as the agent; keepalive pings find a dead peer
      const call = this._stubFor(endpoint).Connect();
      this._call = call;
      this.endpoint = endpoint;
      let welcomed = false;
      let ended = false;
      call.on('data', (msg) => {
        if (msg.body === 'welcome') welcomed = true;
        this._onMessage(msg, call, endpoint);
      });
      call.on('error', (err) => {
        const hint = leaderHint(err);
        if (hint && hint !== endpoint) this._redirectTo = hint;
        if (!this.stopping) this.emit('disconnect', { endpoint, code: err.code, details: err.details });
      });
      call.on('status', () => {
        if (ended) return;
        ended = true;
        // let messages already read be handled before the next session starts
        setImmediate(() => {
          if (this._call === call) this._call = null;
          resolve(welcomed);
        });
      });
      call.write({ hello: this._hello() });
      for (const msg of this.unacked.values()) call.write(msg);
      if (this.draining) call.write({ draining: { reason: 'stopping' } });
    });
  }

  _send(msg) {
    // no stream now: a report waits in `unacked` and goes out after the next hello
    if (this._call && !this.stopping) this._call.write(msg);
  }

  _onMessage(msg, call, endpoint) {
    for (const ack of msg.acks || []) this._onAck(ack);
    switch (msg.body) {
      case 'welcome':
        this.term = msg.welcome.term;
        this.emit('welcome', { ...msg.welcome, endpoint });
        break;
      case 'assign':
        this._onAssign(msg.assign.task);
        break;
      case 'ack':
        this._onAck(msg.ack);
        break;
      case 'cancel':
        this._onCancel(msg.cancel);
        break;
      case 'drain':
        this._onDrain(msg.drain.reason, call).catch((err) => {
          this.log('handling a drain failed; reconnecting', { error: err.message });
          call.cancel();
        });
        break;
      case 'redirect':
        this.emit('redirect', msg.redirect);
        if (msg.redirect.leader_endpoint && msg.redirect.leader_endpoint !== endpoint) {
          this._redirectTo = msg.redirect.leader_endpoint;
          call.cancel();
        }
        break;
      default:
        break; // a newer coordinator's message this client does not know: ignore it
    }
  }

  _onAssign(task) {
    // Python agents ignore these too: a draining agent takes nothing new (the coordinator
    // stops assigning once it has our `draining`), and a repeat is already running
    if (this.draining || this.running.has(task.task_id)) return;
    const token = task.claim_token;
    const entry = { token, abort: new AbortController(), timer: null };
    this.running.set(task.task_id, entry);
    const receivedAtUs = String(Date.now() * 1000);
    // "accepted" (→ RUNNING) only for work that takes a while: a fast task's result
    // carries received_at_us itself, one message fewer per task
    entry.timer = setTimeout(() => {
      if (this.running.get(task.task_id) === entry) {
        this._send({ accepted: { task_id: task.task_id, claim_token: token, received_at_us: receivedAtUs } });
      }
    }, this.acceptedAfterMs);
    this.emit('assign', task);
    this._execute(task, entry, receivedAtUs);
  }

  async _execute(task, entry, receivedAtUs) {
    const { task_id } = task;
    const token = entry.token;
    const limitS = task.spec.timeout_s || this.taskTimeoutS;
    const limit = setTimeout(() => entry.abort.abort(new TimeoutError(`timed out after ${limitS} s`)), limitS * 1000);
    const progress = (fraction, message = '') => {
      if (this.running.get(task_id) === entry) this._send({ progress: { task_id, claim_token: token, fraction, message } });
    };
    let report;
    try {
      const value = await Promise.race([
        Promise.resolve().then(() => this.handler(task, { signal: entry.abort.signal, progress })),
        rejectOnAbort(entry.abort.signal),
      ]);
      const { output, usage } = toOutcome(value);
      report = { result: { task_id, claim_token: token, output, usage, received_at_us: receivedAtUs } };
    } catch (err) {
      const timedOut = err instanceof TimeoutError;
      const error = timedOut ? err.message : `${(err && err.message) || err}`;
      const retryable = timedOut || !(err && err.retryable === false);
      report = { failure: { task_id, claim_token: token, error: error || 'the handler failed without a message', retryable } };
    } finally {
      clearTimeout(limit);
      clearTimeout(entry.timer);
    }
    // cancelled (or re-assigned under a newer claim) meanwhile: the coordinator has moved on
    if (this.running.get(task_id) !== entry) return;
    this.running.delete(task_id);
    this.unacked.set(task_id, report);
    if (this.fencingProbe && report.result) {
      const forged = String(BigInt(token) + 1000000n);
      this._probes.set(`${task_id}/${forged}`, 'forged');
      this._send({ result: { ...report.result, claim_token: forged, output: Buffer.from('FORGED') } });
    }
    this.emit('report', report);
    this._send(report);
  }

  _onAck(ack) {
    const key = `${ack.task_id}/${ack.claim_token}`;
    const probe = this._probes.get(key);
    if (probe) {
      this._probes.delete(key);
      this.emit('fencing', { probe, ...ack });
      return;
    }
    const held = this.unacked.get(ack.task_id);
    if (held && (held.result || held.failure).claim_token === ack.claim_token) {
      this.unacked.delete(ack.task_id);
      if (this.fencingProbe && ack.accepted && held.result) {
        // the task is finished now: the same report again is stale and must be refused
        this._probes.set(key, 'replay');
        this._send(held);
      }
    }
    this.emit('ack', ack);
    this._checkDrained();
  }

  _onCancel({ task_id, reason }) {
    const entry = this.running.get(task_id);
    if (entry) {
      this.running.delete(task_id);
      clearTimeout(entry.timer);
      entry.abort.abort(new Error(`cancelled: ${reason}`));
    }
    this.unacked.delete(task_id);
    this.emit('cancel', { task_id, reason });
    this._checkDrained();
  }

  async _onDrain(reason, call) {
    this.emit('drain', { reason });
    let ttl = -1;
    try {
      ttl = await this.etcd.keepAlive(this.leaseId);
    } catch (err) {
      this.log('cannot check the lease after a drain', { error: err.message });
    }
    if (ttl === 0) {
      // the coordinator dropped us because our lease expired: a new lease, a new stream
      await this._renewLease();
      call.cancel();
      return;
    }
    // otherwise do as asked: take nothing new, finish and report what is held
    this.draining = true;
    this._send({ draining: { reason: `coordinator asked: ${reason}` } });
    this._checkDrained();
  }

  _checkDrained() {
    if (this.draining && !this.running.size && !this.unacked.size) this.emit('drained');
  }

  /**
   * Take nothing new, give held work up to `graceMs` to finish and be acknowledged, then
   * close the stream and revoke the lease (which frees any claim still held at once).
   */
  async stop({ graceMs = 10000 } = {}) {
    if (!this.draining) {
      this.draining = true;
      this._send({ draining: { reason: 'stopping' } });
    }
    const deadline = Date.now() + graceMs;
    while ((this.running.size || this.unacked.size) && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 20));
    }
    this.stopping = true;
    this._wakeAll();
    const call = this._call;
    if (call) call.end(); // half-close: the coordinator sees the agent leave and frees its slots
    const closed = await Promise.race([
      this._loop.then(() => true),
      new Promise((r) => setTimeout(() => r(false), 2000).unref()),
    ]);
    if (!closed && call) call.cancel();
    await Promise.allSettled([this._loop, this._keeper]);
    try {
      if (this.leaseId) await this.etcd.revoke(this.leaseId);
    } catch (err) {
      this.log('could not revoke the lease; it expires by itself', { error: err.message });
    }
    for (const stub of this._stubs.values()) stub.close();
    this._stubs.clear();
  }
}

module.exports = { Agent, toOutcome, TimeoutError };
