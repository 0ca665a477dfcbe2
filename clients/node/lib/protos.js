'use strict';
// Loads the repo's own .proto files at run time (no generated or copied code), so this
// client always speaks the contract checked in next to it.

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// clients/node/lib -> the repo root's protos/ (override for an installed copy).
const PROTO_ROOT = process.env.AGENTMESH_PROTO_ROOT || path.resolve(__dirname, '..', '..', '..', 'protos');

// keepCase: field names as in the .proto (task_id, claim_token), like grpcurl and the docs.
// longs: String, because int64 values (etcd lease ids, claim tokens) exceed 2^53.
// enums: String (TASK_STATE_SUCCEEDED). bytes stay Buffers. oneofs: `body` names the set field.
const LOADER_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };

let cached = null;

/** The agentmesh.v1 package: service constructors and message types. */
function load() {
  if (cached) return cached;
  const dir = path.join(PROTO_ROOT, 'agentmesh', 'v1');
  let files;
  try {
    files = fs.readdirSync(dir).filter((f) => f.endsWith('.proto')).sort();
  } catch (err) {
    throw new Error(`cannot read the agentmesh protos in ${dir} (set AGENTMESH_PROTO_ROOT): ${err.message}`);
  }
  const definition = protoLoader.loadSync(
    files.map((f) => path.join('agentmesh', 'v1', f)),
    { ...LOADER_OPTIONS, includeDirs: [PROTO_ROOT] },
  );
  cached = grpc.loadPackageDefinition(definition).agentmesh.v1;
  return cached;
}

// The servers accept and send up to 64 MiB (a ListTasks page of large tasks); keepalive
// pings find a dead peer of a long-lived stream (Connect, WatchTask) within ~15 s. A
// channel to a coordinator that died backs off its reconnects up to 2 s, not grpc's
// default 120 s, so a coordinator restarted at the same address is found again soon
// (the callers add their own jittered backoff on top).
const CHANNEL_OPTIONS = {
  'grpc.max_receive_message_length': 64 * 1024 * 1024,
  'grpc.max_send_message_length': 64 * 1024 * 1024,
  'grpc.keepalive_time_ms': 10000,
  'grpc.keepalive_timeout_ms': 5000,
  'grpc.initial_reconnect_backoff_ms': 100,
  'grpc.max_reconnect_backoff_ms': 2000,
};

/** A Coordinator stub on `endpoint` (host:port, plaintext). */
function coordinatorStub(endpoint) {
  const { Coordinator } = load();
  return new Coordinator(endpoint, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);
}

module.exports = { load, coordinatorStub, PROTO_ROOT };
