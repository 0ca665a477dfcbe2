#!/usr/bin/env node
'use strict';
// agentmesh's Node.js command line: a client (submit, watch, get, list, cancel, status)
// and an agent (agent). `node agentmesh.js help` lists the commands and options.

const os = require('os');
const { status: grpcStatus } = require('@grpc/grpc-js');
const { MeshClient, TERMINAL } = require('./lib/client');
const { Agent } = require('./lib/agent');
const { handlerFor, EXECUTORS } = require('./lib/executors');
const { taskView, state } = require('./lib/format');

const USAGE = `usage: node agentmesh.js COMMAND [options]

client commands
  submit --kind K [--payload TEXT | --payload-base64 B64] [--count N] [--task-id ID]
         [--priority 0-9] [--max-attempts N] [--stream] [--wait] [--timeout S]
                        submit one task (Submit) or N (SubmitBatch, 500 a call);
                        --stream sends each as a message of one SubmitStream call
                        (the unanswered ones again on a new stream if it breaks);
                        --wait watches each to its end (WatchTask)
  watch ID [ID ...] [--timeout S]   every change of each task until it ends
  get ID                            one task (GetTask)
  list [--state S[,S]] [--kind K] [--agent A] [--limit N]    tasks (ListTasks)
  cancel ID [--reason R]            cancel a task (CancelTask)
  status                            leader, term, agents, queue (GetStatus)

agent
  agent [--agent-id ID] [--kinds ${Object.keys(EXECUTORS).join(',')}] [--capacity N]
        [--roles R,R] [--labels k=v,k=v] [--pool-id P] [--lease-ttl S] [--probe-fencing]
                        run one agent over Coordinator.Connect until SIGTERM/SIGINT;
                        its etcd lease comes from --etcd (required)

common options
  --coordinator HOST:PORT[,HOST:PORT]   a coordinator to ask first [env AGENTMESH_COORDINATOR];
                                        a standby's pointer to the leader is followed
  --etcd HOST:PORT[,...]                etcd: leader lookup and the agent's lease
                                        [env AGENTMESH_ETCD; default 127.0.0.1:2379
                                        when no --coordinator is given]
  --cluster NAME                        key prefix /agentmesh/NAME/ [env AGENTMESH_CLUSTER]
  --json                                JSON lines on stdout (for scripts and tests)
  --call-timeout-ms MS                  deadline of each call (default 10000)
  --retry-ms MS                         how long a call retries while no leader answers (default 15000)
`;

const BOOLEAN = new Set(['wait', 'json', 'stream', 'probe-fencing', 'help']);

function parseArgs(argv) {
  const opts = {};
  const positional = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (!arg.startsWith('--')) {
      positional.push(arg);
      continue;
    }
    const eq = arg.indexOf('=');
    const name = arg.slice(2, eq < 0 ? undefined : eq);
    if (BOOLEAN.has(name)) {
      opts[name] = true;
    } else if (eq >= 0) {
      opts[name] = arg.slice(eq + 1);
    } else if (i + 1 < argv.length) {
      opts[name] = argv[++i];
    } else {
      throw new UsageError(`--${name} needs a value`);
    }
  }
  return { opts, positional };
}

class UsageError extends Error {}

const CODE_NAMES = Object.fromEntries(Object.entries(grpcStatus).map(([k, v]) => [v, k]));

function int(opts, name, dflt, lo, hi) {
  if (opts[name] === undefined) return dflt;
  const n = Number(opts[name]);
  if (!Number.isInteger(n) || n < lo || n > hi) throw new UsageError(`--${name} must be an integer ${lo}-${hi}`);
  return n;
}

function list(value) {
  return String(value || '').split(',').map((s) => s.trim()).filter(Boolean);
}

function endpoints(opts) {
  const coordinator = opts.coordinator || process.env.AGENTMESH_COORDINATOR || '';
  const etcd = opts.etcd || process.env.AGENTMESH_ETCD || (coordinator ? '' : '127.0.0.1:2379');
  const cluster = opts.cluster || process.env.AGENTMESH_CLUSTER || 'default';
  return { coordinator, etcd, cluster };
}

function makeOut(json) {
  return {
    json,
    emit(event, fields, human) {
      if (json) process.stdout.write(`${JSON.stringify({ event, ...fields })}\n`);
      else if (human !== undefined) process.stdout.write(`${human}\n`);
    },
    log(msg, fields = {}) {
      const extra = Object.entries(fields).map(([k, v]) => `${k}=${v}`).join(' ');
      process.stderr.write(`agentmesh-node: ${msg}${extra ? ` ${extra}` : ''}\n`);
    },
  };
}

function shown(bytes) {
  return bytes.text !== undefined ? JSON.stringify(bytes.text) : `base64:${bytes.base64}`;
}

function humanTask(v) {
  const lines = [`${v.task_id}  ${v.kind}  ${v.state}  attempts ${v.attempts}  agent ${v.agent_id || '-'}`];
  lines.push(`  payload  ${shown(v.payload)}`);
  if (v.state === 'SUCCEEDED') lines.push(`  result   ${shown(v.result)}`);
  if (v.last_error) lines.push(`  error    ${v.last_error}`);
  lines.push(`  created  ${v.created_at || '-'}   finished ${v.finished_at || '-'}`);
  return lines.join('\n');
}

function client(opts, out) {
  const { coordinator, etcd, cluster } = endpoints(opts);
  return new MeshClient({
    coordinator,
    etcd,
    cluster,
    timeoutMs: int(opts, 'call-timeout-ms', 10000, 1, 3600000),
    retryMs: int(opts, 'retry-ms', 15000, 0, 3600000),
    log: out.log,
  });
}

/** Run `fn` over items with at most `limit` in flight. */
// WatchTask streams open at once for `submit --wait` and `watch`. A coordinator serves
// 64 watchers in all (AGENTMESH_MAX_WATCHERS), shared with the dashboard, `agentmesh
// status` and every other client: 64 here took them all, and the one more was refused.
const WATCHES = 8;

async function pool(items, limit, fn) {
  const results = new Array(items.length);
  let next = 0;
  const workers = Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (next < items.length) {
      const i = next++;
      results[i] = await fn(items[i], i);
    }
  });
  await Promise.all(workers);
  return results;
}

async function cmdSubmit(opts, out) {
  if (!opts.kind) throw new UsageError('submit needs --kind');
  const count = int(opts, 'count', 1, 1, 100000);
  const payload = opts['payload-base64'] !== undefined ? Buffer.from(opts['payload-base64'], 'base64') : Buffer.from(opts.payload || '', 'utf8');
  const specs = [];
  for (let i = 0; i < count; i++) {
    const spec = { kind: opts.kind, payload, priority: int(opts, 'priority', 0, 0, 9), max_attempts: int(opts, 'max-attempts', 0, 0, 100) };
    if (opts['task-id']) spec.task_id = count === 1 ? opts['task-id'] : `${opts['task-id']}-${i}`;
    specs.push(spec);
  }
  const mesh = client(opts, out);
  try {
    let results;
    if (opts.stream) {
      results = await mesh.submitStream(specs);
    } else if (count === 1) {
      results = [await mesh.submit(specs[0])];
    } else {
      results = [];
      for (let i = 0; i < specs.length; i += 500) {
        const resp = await mesh.submitBatch(specs.slice(i, i + 500));
        results.push(...resp.results);
      }
    }
    for (const r of results) {
      out.emit('submitted', { created: r.created, task: taskView(r.task) }, `${r.task.task_id} ${r.created ? 'created' : 'exists'} ${state(r.task.state)}`);
    }
    const states = {};
    if (opts.wait) {
      const timeoutMs = int(opts, 'timeout', 120, 1, 86400) * 1000;
      await pool(results, WATCHES, async (r) => {
        const task = await mesh.waitTerminal(r.task.task_id, { timeoutMs });
        const v = taskView(task);
        states[v.state] = (states[v.state] || 0) + 1;
        out.emit('finished', { task: v }, humanTask(v));
      });
    }
    const summary = { submitted: results.length, created: results.filter((r) => r.created).length, states, endpoint: mesh.endpoint, redirects: mesh.redirects, stream_retries: mesh.streamRetries };
    out.emit('summary', summary, `${summary.submitted} submitted (${summary.created} new) via ${summary.endpoint}` + (opts.wait ? `; ${Object.entries(states).map(([k, v]) => `${k} ${v}`).join(', ')}` : ''));
    if (opts.wait && (states.SUCCEEDED || 0) !== results.length) return 3;
    return 0;
  } finally {
    mesh.close();
  }
}

async function cmdWatch(opts, positional, out) {
  if (!positional.length) throw new UsageError('watch needs at least one task id');
  const mesh = client(opts, out);
  const timeoutMs = int(opts, 'timeout', 300, 1, 86400) * 1000;
  let allSucceeded = true;
  try {
    await pool(positional, WATCHES, async (id) => {
      let last = null;
      for await (const ev of mesh.watchTask(id, { timeoutMs })) {
        last = taskView(ev.task);
        out.emit('task', { previous_state: state(ev.previous_state), task: last }, `${id} ${state(ev.previous_state)} -> ${last.state}`);
      }
      if (!last || last.state !== 'SUCCEEDED') allSucceeded = false;
      if (last) out.emit('finished', { task: last }, humanTask(last));
    });
    out.emit('summary', { endpoint: mesh.endpoint, redirects: mesh.redirects });
    return allSucceeded ? 0 : 3;
  } finally {
    mesh.close();
  }
}

async function cmdGet(opts, positional, out) {
  if (positional.length !== 1) throw new UsageError('get needs one task id');
  const mesh = client(opts, out);
  try {
    const v = taskView(await mesh.getTask(positional[0]));
    out.emit('task', { task: v, endpoint: mesh.endpoint, redirects: mesh.redirects }, humanTask(v));
    return 0;
  } finally {
    mesh.close();
  }
}

async function cmdList(opts, out) {
  const mesh = client(opts, out);
  try {
    const states = list(opts.state).map((s) => `TASK_STATE_${s.toUpperCase()}`);
    const resp = await mesh.listTasks({ states, kind: opts.kind || '', agent_id: opts.agent || '', page_size: int(opts, 'limit', 100, 1, 1000) });
    for (const t of resp.tasks) {
      const v = taskView(t);
      out.emit('task', { task: v }, `${v.task_id}  ${v.kind}  ${v.state}  attempts ${v.attempts}  agent ${v.agent_id || '-'}`);
    }
    out.emit('summary', { count: resp.tasks.length, more: Boolean(resp.next_page_token), endpoint: mesh.endpoint, redirects: mesh.redirects }, resp.next_page_token ? `(more: showing the first ${resp.tasks.length})` : undefined);
    return 0;
  } finally {
    mesh.close();
  }
}

async function cmdCancel(opts, positional, out) {
  if (positional.length !== 1) throw new UsageError('cancel needs one task id');
  const mesh = client(opts, out);
  try {
    const v = taskView(await mesh.cancelTask(positional[0], opts.reason || ''));
    out.emit('task', { task: v }, humanTask(v));
    return 0;
  } finally {
    mesh.close();
  }
}

async function cmdStatus(opts, out) {
  const mesh = client(opts, out);
  try {
    const s = await mesh.status();
    out.emit('status', { status: s, endpoint: mesh.endpoint }, [
      `leader   ${s.leader_id || '-'} at ${s.leader_endpoint || '-'}  term ${s.term}`,
      `agents   ${s.agents_connected} connected   queue depth ${s.queue_depth}`,
      `tasks    ${Object.entries(s.task_counts || {}).map(([k, v]) => `${k} ${v}`).join('  ') || '-'}`,
    ].join('\n'));
    return 0;
  } finally {
    mesh.close();
  }
}

async function cmdAgent(opts, out) {
  const { coordinator, etcd, cluster } = endpoints(opts);
  if (!etcd) throw new UsageError('agent needs --etcd (its claims live on an etcd lease it takes there)');
  const kinds = list(opts.kinds || 'echo,upper,sleep');
  const labels = {};
  for (const item of list(opts.labels)) {
    const [k, ...rest] = item.split('=');
    if (!k || !rest.length) throw new UsageError(`--labels item ${item} must be key=value`);
    labels[k] = rest.join('=');
  }
  const agent = new Agent({
    agentId: opts['agent-id'] || `node-${os.hostname()}-${process.pid}`.replace(/[^A-Za-z0-9._-]/g, '-').slice(0, 128),
    poolId: opts['pool-id'] || 'node',
    kinds,
    roles: list(opts.roles),
    labels,
    capacity: int(opts, 'capacity', 1, 1, 1000),
    leaseTtlS: int(opts, 'lease-ttl', 5, 2, 3600),
    handler: handlerFor(kinds),
    etcd,
    coordinator,
    cluster,
    fencingProbe: Boolean(opts['probe-fencing']),
    log: out.log,
  });
  agent.on('lease', (e) => out.emit('lease', e, `lease ${e.lease_id}`));
  agent.on('welcome', (e) => out.emit('welcome', e, `connected to ${e.endpoint} (${e.coordinator_id}, term ${e.term})`));
  agent.on('redirect', (e) => out.emit('redirect', e, `redirected to ${e.leader_endpoint}`));
  agent.on('disconnect', (e) => out.emit('disconnect', { ...e, code: CODE_NAMES[e.code] || e.code }, `stream to ${e.endpoint} ended: ${CODE_NAMES[e.code] || e.code} ${e.details || ''}`));
  agent.on('assign', (t) => out.emit('assign', { task_id: t.task_id, kind: t.spec.kind, claim_token: t.claim_token }, `assigned ${t.task_id} (${t.spec.kind}, claim ${t.claim_token})`));
  agent.on('report', (r) => {
    const body = r.result || r.failure;
    out.emit('report', { task_id: body.task_id, claim_token: body.claim_token, ok: Boolean(r.result), error: r.failure ? r.failure.error : undefined }, `reported ${body.task_id}: ${r.result ? 'result' : `failure (${r.failure.error})`}`);
  });
  agent.on('ack', (a) => out.emit('ack', a, `ack ${a.task_id}: ${a.accepted ? 'accepted' : `refused (${a.reason})`}`));
  agent.on('fencing', (a) => out.emit('fencing', a, `fencing probe ${a.probe} for ${a.task_id}: ${a.accepted ? 'ACCEPTED (fencing broken!)' : `refused (${a.reason})`}`));
  agent.on('cancel', (c) => out.emit('cancel', c, `cancelled ${c.task_id}: ${c.reason}`));
  agent.on('drain', (d) => out.emit('drain', d, `coordinator asks to drain: ${d.reason}`));
  await agent.start();
  out.emit('started', { agent_id: agent.agentId, kinds, lease_id: agent.leaseId }, `agent ${agent.agentId} started (kinds ${kinds.join(',')})`);
  const code = await new Promise((resolve) => {
    let stopping = false;
    const stop = async (why) => {
      if (stopping) return;
      stopping = true;
      out.emit('stopping', { reason: why }, `stopping (${why})`);
      await agent.stop({ graceMs: 10000 });
      resolve(0);
    };
    process.on('SIGTERM', () => stop('SIGTERM'));
    process.on('SIGINT', () => stop('SIGINT'));
    agent.on('drained', () => stop('drained at the coordinator\'s request'));
  });
  out.emit('stopped', { agent_id: agent.agentId }, 'stopped');
  return code;
}

async function main(argv) {
  const [command, ...rest] = argv;
  if (!command || command === 'help' || command === '--help') {
    process.stdout.write(USAGE);
    return command ? 0 : 2;
  }
  const { opts, positional } = parseArgs(rest);
  if (opts.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  const out = makeOut(Boolean(opts.json));
  switch (command) {
    case 'submit': return cmdSubmit(opts, out);
    case 'watch': return cmdWatch(opts, positional, out);
    case 'get': return cmdGet(opts, positional, out);
    case 'list': return cmdList(opts, out);
    case 'cancel': return cmdCancel(opts, positional, out);
    case 'status': return cmdStatus(opts, out);
    case 'agent': return cmdAgent(opts, out);
    default: throw new UsageError(`unknown command ${command}`);
  }
}

/**
 * Exit once stdout and stderr have flushed. A write to a full pipe (`| jq`) is queued,
 * and process.exit() would drop the queue: the output would end early, with exit code 0.
 */
function exitFlushed(code) {
  let left = 2;
  const flushed = () => {
    left -= 1;
    if (left === 0) process.exit(code);
  };
  process.stdout.write('', flushed);
  process.stderr.write('', flushed);
}

if (require.main === module) {
  // a reader that went away (`| head`) ends the output, not with a stack trace
  for (const stream of [process.stdout, process.stderr]) {
    stream.on('error', (err) => process.exit(err.code === 'EPIPE' ? 0 : 1));
  }
  main(process.argv.slice(2)).then(
    (code) => exitFlushed(code),
    (err) => {
      if (err instanceof UsageError) {
        process.stderr.write(`error: ${err.message}\n\n${USAGE}`);
        exitFlushed(2);
        return;
      }
      const name = CODE_NAMES[err.code];
      process.stderr.write(`error: ${name ? `${name}: ${err.details}` : err.message}\n`);
      exitFlushed(1);
    },
  );
}

module.exports = { parseArgs, main };
