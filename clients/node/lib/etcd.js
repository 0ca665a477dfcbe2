'use strict';
// The few etcd calls a non-Python client or agent needs, over etcd's own JSON gateway
// (HTTP POST to /v3/... on the client URL, served by etcd 3.4 and later): find the
// coordinator leader, and grant / keep alive / revoke the lease an agent's claims live on.
// No etcd client library and no second copy of etcd's protos: Node's http module only.
// Keys and values travel base64-encoded; int64 fields (lease ids) travel as strings.

const http = require('http');
const https = require('https');
const { unavailable } = require('./retry');

const b64 = (s) => Buffer.from(s).toString('base64');

/** The range end that covers every key starting with `prefix` (as etcd's clientv3 computes it). */
function prefixEnd(prefix) {
  const end = Buffer.from(prefix);
  for (let i = end.length - 1; i >= 0; i--) {
    if (end[i] < 0xff) {
      end[i] += 1;
      return end.subarray(0, i + 1);
    }
  }
  return Buffer.from([0]);
}

/** 'host:port[,host:port]' or URLs → base URLs ('http://host:port'). */
function parseEndpoints(endpoints) {
  const list = String(endpoints || '')
    .split(',')
    .map((e) => e.trim())
    .filter(Boolean)
    .map((e) => (/^https?:\/\//.test(e) ? e.replace(/\/+$/, '') : `http://${e}`));
  if (!list.length) throw new Error('no etcd endpoint given: pass --etcd host:port (or set AGENTMESH_ETCD)');
  return list;
}

class EtcdGateway {
  /**
   * @param {string} endpoints etcd client endpoints, 'host:port[,host:port]'.
   * @param {object} [opts]
   * @param {string} [opts.cluster] the agentmesh cluster name (keys live under /agentmesh/<cluster>/).
   * @param {number} [opts.timeoutMs] deadline of each request.
   */
  constructor(endpoints, { cluster = 'default', timeoutMs = 3000 } = {}) {
    this.urls = parseEndpoints(endpoints);
    this.prefix = `/agentmesh/${cluster}/`;
    this.timeoutMs = timeoutMs;
    this._next = 0;
  }

  /** POST a JSON body to one endpoint after another until one answers. */
  async post(path, body) {
    let lastErr;
    for (let i = 0; i < this.urls.length; i++) {
      const url = this.urls[(this._next + i) % this.urls.length];
      try {
        const out = await this._post(url + path, body);
        this._next = (this._next + i) % this.urls.length; // stay on the member that answered
        return out;
      } catch (err) {
        lastErr = err;
      }
    }
    throw unavailable(`etcd is unreachable at ${this.urls.join(', ')}: ${lastErr && lastErr.message}`);
  }

  _post(url, body) {
    const data = Buffer.from(JSON.stringify(body));
    const mod = url.startsWith('https:') ? https : http;
    return new Promise((resolve, reject) => {
      const req = mod.request(
        url,
        { method: 'POST', headers: { 'content-type': 'application/json', 'content-length': data.length }, timeout: this.timeoutMs },
        (res) => {
          const chunks = [];
          res.on('data', (c) => chunks.push(c));
          res.on('error', reject);
          res.on('end', () => {
            const text = Buffer.concat(chunks).toString('utf8');
            let parsed;
            try {
              parsed = text ? JSON.parse(text) : {};
            } catch (err) {
              reject(new Error(`etcd answered ${res.statusCode} with non-JSON: ${text.slice(0, 200)}`));
              return;
            }
            if (res.statusCode !== 200) {
              reject(new Error(`etcd answered ${res.statusCode}: ${parsed.message || parsed.error || text.slice(0, 200)}`));
              return;
            }
            resolve(parsed);
          });
        },
      );
      req.on('timeout', () => req.destroy(new Error(`no answer within ${this.timeoutMs} ms`)));
      req.on('error', reject);
      req.end(data);
    });
  }

  /**
   * The current leader of `role` ('' when none): the election key with the lowest
   * create revision under election/<role>/, whose value is '<node id> <endpoint>'.
   */
  async leader(role = 'coordinator') {
    const prefix = `${this.prefix}election/${role}/`;
    const resp = await this.post('/v3/kv/range', {
      key: b64(prefix),
      range_end: prefixEnd(prefix).toString('base64'),
      sort_order: 'ASCEND',
      sort_target: 'CREATE',
      limit: 1,
    });
    const kv = (resp.kvs || [])[0];
    if (!kv || !kv.value) return '';
    const value = Buffer.from(kv.value, 'base64').toString('utf8');
    const space = value.indexOf(' ');
    return space < 0 ? '' : value.slice(space + 1);
  }

  /** A new lease of `ttlS` seconds; returns its id (a decimal string: ids exceed 2^53). */
  async grant(ttlS) {
    const resp = await this.post('/v3/lease/grant', { TTL: ttlS });
    if (!resp.ID || resp.error) throw new Error(`etcd refused the lease: ${resp.error || JSON.stringify(resp)}`);
    return String(resp.ID);
  }

  /** Refresh a lease once; returns its new TTL in seconds, 0 when etcd no longer has it. */
  async keepAlive(id) {
    const resp = await this.post('/v3/lease/keepalive', { ID: id });
    return Number((resp.result && resp.result.TTL) || 0);
  }

  async revoke(id) {
    await this.post('/v3/lease/revoke', { ID: id });
  }

  /** Put `key` (relative to the cluster prefix) on `lease`. */
  async put(key, value, lease) {
    await this.post('/v3/kv/put', { key: b64(this.prefix + key), value: b64(value), lease });
  }
}

module.exports = { EtcdGateway, prefixEnd, parseEndpoints };
