// The agentmesh dashboard: polls /api/snapshot (every second) and the dead-letter queue
// (every 5 s) and draws them. Every value from the cluster goes in as text (textContent),
// never as HTML, so an id or an error message cannot inject markup.
'use strict';

const SVG = 'http://www.w3.org/2000/svg';
const DASH = '—';
const $ = (id) => document.getElementById(id);
const SEEN_STATES = new Set(['SUCCEEDED', 'DEAD_LETTER', 'CANCELLED', 'FAILED', 'REQUEUED']);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function setText(id, value) { $(id).textContent = value === null || value === undefined ? DASH : String(value); }

function taskLink(id) { return el('a', { href: '/task?id=' + encodeURIComponent(id) }, id); }

function clockTime(us) { return us ? new Date(us / 1000).toLocaleTimeString() : DASH; }
function localDate(us) { return us ? new Date(us / 1000).toLocaleString() : DASH; }

function dur(seconds) {
  if (seconds === null || seconds === undefined) return DASH;
  if (seconds < 1) return Math.round(seconds * 1000) + ' ms';
  if (seconds < 60) return seconds.toFixed(1) + ' s';
  const s = Math.round(seconds);
  if (s < 3600) return Math.floor(s / 60) + ' min ' + (s % 60) + ' s';
  return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min';
}
function num(n) { return n === null || n === undefined ? DASH : Number(n).toLocaleString('en-US'); }
function ms(v) { return v === null || v === undefined ? DASH : v.toFixed(1); }

async function getJSON(url) {
  const resp = await fetch(url, { cache: 'no-store' });
  const body = await resp.json();
  if (!resp.ok) throw new Error(body.error || ('HTTP ' + resp.status));
  return body;
}

function fillBody(table, rows) {
  const body = table.tBodies[0];
  body.replaceChildren(...rows);
}

// ---------------------------------------------------------------- charts

function chart(svg, axis, legend, series, lines) {
  const W = 600, H = 180, PAD = 4;
  svg.replaceChildren();
  legend.replaceChildren(...lines.map((l) => el('span', {}, el('i', { class: 'sw-' + l.key }), l.label)));
  for (const [i, l] of lines.entries()) legend.children[i].firstChild.style.background = l.color;
  if (!series.length) { axis.replaceChildren(el('span', {}, 'no data yet')); return; }
  let top = 0;
  for (const p of series) for (const l of lines) if (p[l.key] !== null && p[l.key] > top) top = p[l.key];
  top = top > 0 ? top * 1.1 : 1;
  const x = (i) => series.length === 1 ? W / 2 : (i / (series.length - 1)) * (W - 2 * PAD) + PAD;
  const y = (v) => H - PAD - (v / top) * (H - 2 * PAD);
  for (const frac of [0.25, 0.5, 0.75]) {
    const g = document.createElementNS(SVG, 'line');
    g.setAttribute('x1', 0); g.setAttribute('x2', W);
    g.setAttribute('y1', y(top * frac)); g.setAttribute('y2', y(top * frac));
    g.setAttribute('stroke', '#e4e7ec'); g.setAttribute('stroke-width', '1');
    svg.append(g);
  }
  for (const l of lines) {
    // a null (no sample in a bucket) breaks the line instead of drawing a false zero
    let d = '';
    let pen = false;
    series.forEach((p, i) => {
      const v = p[l.key];
      if (v === null || v === undefined) { pen = false; return; }
      d += (pen ? 'L' : 'M') + x(i).toFixed(1) + ' ' + y(v).toFixed(1) + ' ';
      pen = true;
    });
    if (!d) continue;
    const path = document.createElementNS(SVG, 'path');
    path.setAttribute('d', d);
    path.setAttribute('fill', 'none');
    path.setAttribute('stroke', l.color);
    path.setAttribute('stroke-width', '2');
    path.setAttribute('vector-effect', 'non-scaling-stroke');
    path.setAttribute('data-series', l.key);
    svg.append(path);
  }
  axis.replaceChildren(
    el('span', {}, clockTime(series[0].t_us)),
    el('span', {}, 'max ' + (top / 1.1).toFixed(top / 1.1 >= 10 ? 0 : 1)),
    el('span', {}, clockTime(series[series.length - 1].t_us)),
  );
}

// ---------------------------------------------------------------- the snapshot

function render(s) {
  setText('cluster', s.cluster);
  setText('leader-id', s.leader.id || 'none elected');
  setText('leader-endpoint', s.leader.endpoint || DASH);
  setText('leader-term', s.leader.term || DASH);
  $('standbys').textContent = s.leader.standbys.map((x) => 'standby ' + x.id + ' at ' + x.endpoint).join(', ');
  setText('stream', s.source.event_stream);
  $('stream').className = s.source.event_stream === 'connected' ? 'h-SERVING' : 'h-bad';
  $('stream-detail').textContent = '(' + num(s.source.events) + ' events since ' + clockTime(s.source.started_us) +
    ', ' + s.source.gaps + ' gaps)';
  setText('updated', clockTime(s.generated_at_us));

  const problems = Object.entries(s.source.errors).map(([k, e]) =>
    el('li', {}, k + ': ' + e.message + ' (since ' + clockTime(e.since_us) + ')'));
  for (const c of s.leader.changes.slice(-3)) {
    problems.push(el('li', { class: 'muted' }, 'leader changed at ' + clockTime(c.at_us) + ': term ' +
      c.previous_term + ' → ' + c.term + ' (' + (c.leader_endpoint || 'none') + ')'));
  }
  $('problems').replaceChildren(...problems);

  setText('agent-count', num(s.agents.total));
  $('agent-note').textContent = 'by ' + s.agents.group_by + ': ' + s.agents.groups.map((g) => g.key + ' ' + g.count).join(', ');
  setText('queue-depth', num(s.queue.depth));
  $('queue-note').textContent = 'queued, waiting for an agent';
  setText('inflight', num(s.eta.inflight));
  const thr = s.throughput;
  $('throughput-now').textContent = thr.now_per_s.toFixed(1) + '/s';
  $('throughput-now').setAttribute('data-value', String(thr.now_per_s));
  $('throughput-note').textContent = 'finished, last ' + thr.window_s + ' s; peak ' + thr.peak_per_s.toFixed(0) + '/s';
  const eta = s.eta;
  $('eta').textContent = eta.backlog === 0 ? 'done' : eta.eta_s === null ? 'no ETA' : dur(eta.eta_s);
  $('eta-note').textContent = num(eta.backlog) + ' left at ' + eta.rate_per_s.toFixed(1) + '/s';
  const rec = s.latency.recent;
  $('latency-e2e').textContent = ms(rec.e2e.p50_ms) + ' / ' + ms(rec.e2e.p95_ms) + ' ms';
  $('latency-note').textContent = 'last ' + rec.window_s + ' s, ' + num(rec.e2e.n) + ' tasks; dispatch p50 ' +
    ms(rec.dispatch.p50_ms) + ' ms';

  const perS = (k) => (p) => p[k] === null ? null : p[k] / thr.bucket_s;
  const tseries = thr.series.map((p) => ({
    t_us: p.t_us, finished: perS('finished')(p), submitted: perS('submitted')(p),
    failed: perS('failed_attempts')(p), dead: perS('dead_letter')(p),
  }));
  chart($('chart-throughput'), $('axis-throughput'), $('legend-throughput'), tseries, [
    { key: 'submitted', label: 'submitted', color: '#8c959f' },
    { key: 'finished', label: 'finished', color: '#1a7f37' },
    { key: 'failed', label: 'failed attempts', color: '#bf8700' },
    { key: 'dead', label: 'dead-lettered', color: '#cf222e' },
  ]);
  chart($('chart-latency'), $('axis-latency'), $('legend-latency'), s.latency.series, [
    { key: 'e2e_p50_ms', label: 'e2e p50', color: '#0969da' },
    { key: 'e2e_p95_ms', label: 'e2e p95', color: '#8250df' },
    { key: 'dispatch_p50_ms', label: 'dispatch p50', color: '#bf8700' },
    { key: 'run_p50_ms', label: 'run p50', color: '#1a7f37' },
  ]);

  fillBody($('services'), s.services.map((x) => {
    const health = el('span', { class: x.health === 'SERVING' ? 'h-SERVING' : x.health === 'UNKNOWN' ? 'h-UNKNOWN' : 'h-bad' }, x.health);
    return el('tr', {}, el('td', {}, x.kind), el('td', {}, x.id), el('td', {}, x.endpoint), el('td', {}, x.role || DASH), el('td', {}, health));
  }));
  $('sections').replaceChildren(...Object.values(s.sections).map((x) =>
    el('p', { class: 'section-note' }, el('b', {}, x.label + ': '), x.status, x.message ? el('span', { class: 'muted' }, ' (' + x.message + ')') : null)));
  const healthRunning = s.sections.health && s.sections.health.instances > 0;
  $('alerts').replaceChildren(...(s.alerts.length ? s.alerts.map((a) =>
    el('li', { class: 'error' }, (a.kind || '') + ' ' + (a.agent_id || '') + ': ' + (a.message || '')))
    : [el('li', { class: 'muted' }, healthRunning ? 'none open' : 'none (alerts come from the health monitor, which is not running)')]));

  const leader = s.counts.leader, seen = s.counts.seen;
  const countRows = [];
  const states = new Set([...Object.keys(leader.by_state), ...Object.keys(seen.by_state)]);
  countRows.push(el('tr', {}, el('th', {}, ''), el('th', { class: 'num' }, 'leader (term ' + (leader.term || DASH) + ')'), el('th', { class: 'num' }, 'seen here')));
  countRows.push(el('tr', {}, el('th', {}, 'submitted'), el('td', { class: 'num' }, DASH), el('td', { class: 'num', id: 'seen-submitted' }, num(seen.submitted))));
  for (const st of [...states].sort()) {
    countRows.push(el('tr', {}, el('th', {}, st + (st === 'FAILED' ? ' (attempts retried)' : '')),
      el('td', { class: 'num' }, num(leader.by_state[st] ?? null)),
      // the stream counts changes into finished states (and retries), not what is waiting
      el('td', { class: 'num', id: 'seen-' + st }, num(seen.by_state[st] ?? (SEEN_STATES.has(st) ? 0 : null)))));
  }
  fillBody($('counts'), countRows);
  $('counts-covers').textContent = 'leader: ' + leader.covers + '. seen here: ' + seen.covers + '.';

  const prio = Object.entries(s.queue.by_priority);
  fillBody($('queue-priority'), prio.length ? [
    el('tr', {}, el('th', {}, 'priority'), ...prio.map(([p]) => el('th', { class: 'num' }, p))),
    el('tr', {}, el('th', {}, 'queued'), ...prio.map(([, n]) => el('td', { class: 'num' }, num(n)))),
  ] : [el('tr', {}, el('td', { class: 'muted' }, s.queue.depth ? 'not sampled yet (every 5 s)' : 'nothing queued'))]);
  $('queue-covers').textContent = 'covers ' + s.queue.covers + (s.queue.sampled_at_us ? ', read ' + clockTime(s.queue.sampled_at_us) : '');
  $('costs').textContent = s.costs.total_usd === null ? 'cost: ' + DASH + ' (no finished task seen reported usage)'
    : 'cost $' + s.costs.total_usd.toFixed(4) + ' (' + num(s.costs.input_tokens) + ' tokens in, ' +
      num(s.costs.output_tokens) + ' out; ' + s.costs.covers + ')';

  renderAgents(s.agents);

  fillBody($('failures'), s.recent_failures.length ? s.recent_failures.map((f) => el('tr', {},
    el('td', {}, clockTime(f.at_us)), el('td', {}, taskLink(f.task_id)),
    el('td', {}, el('span', { class: 'state s-' + f.state }, f.state)), el('td', {}, f.attempts),
    el('td', { class: 'error' }, f.error))) : [el('tr', {}, el('td', { class: 'muted', colspan: '5' }, 'none seen'))]);
}

function renderAgents(agents) {
  $('agents-caption').textContent = '(' + num(agents.total) + ' connected, by ' + agents.group_by + ')';
  const rows = [];
  for (const g of agents.groups) {
    rows.push(el('tr', { class: 'group' }, el('td', { colspan: '4' }, g.key + ' (' + g.count + ' agents)'),
      el('td', {}, g.inflight + '/' + g.capacity), el('td', {}, ''), el('td', {}, ''),
      el('td', { class: 'num' }, num(g.completed)), el('td', { class: 'num' }, num(g.failed)), el('td', {}, '')));
    for (const a of g.agents) {
      const bar = el('span', { class: 'bar' }, el('span', {}));
      bar.firstChild.style.width = Math.min(100, Math.round(a.load * 100)) + '%';
      let running = a.inflight ? a.inflight + ' in flight' : 'idle';
      const cell = el('td', {});
      if (a.tasks.length) {
        const t = a.tasks[0];
        cell.append(taskLink(t.task_id), ' ' + t.state.toLowerCase() + (t.for_ms !== null ? ' ' + dur(t.for_ms / 1000) : ''));
        if (t.progress_updates) cell.append(' (' + t.progress_updates + ' progress)');
        const more = a.tasks.length - 1 + a.tasks_more;
        if (more) cell.append(' +' + more);
      } else {
        cell.append(running);
      }
      const health = a.health ? (a.health.state || DASH) : DASH;
      rows.push(el('tr', { 'data-agent': a.id },
        el('td', {}, a.id + (a.draining ? ' (draining)' : '')), el('td', {}, a.pool), el('td', {}, a.roles.join(',') || DASH),
        el('td', {}, health), el('td', {}, bar, a.inflight + '/' + a.capacity), cell,
        el('td', { class: 'num' }, a.latency_ema_ms.toFixed(1)), el('td', { class: 'num' }, num(a.completed)),
        el('td', { class: 'num' }, num(a.failed)), el('td', { class: 'num' }, a.cost_usd === null ? DASH : a.cost_usd.toFixed(4))));
    }
  }
  if (!rows.length) rows.push(el('tr', {}, el('td', { colspan: '10', class: 'muted' }, 'no agent connected')));
  fillBody($('agents'), rows);
}

// ---------------------------------------------------------------- the dead-letter queue

function renderDLQ(resp) {
  $('dlq-caption').textContent = '(' + resp.tasks.length + (resp.next_page_token ? '+' : '') + ' tasks)';
  fillBody($('dlq'), resp.tasks.length ? resp.tasks.map((t) => el('tr', { 'data-task': t.task_id },
    el('td', {}, taskLink(t.task_id)), el('td', {}, t.kind), el('td', {}, t.attempts),
    el('td', {}, t.agent_id || DASH), el('td', {}, t.finished || DASH), el('td', { class: 'error' }, t.last_error)))
    : [el('tr', {}, el('td', { colspan: '6', class: 'muted' }, resp.next_page_token
      ? el('a', { href: '/tasks?state=DEAD_LETTER&page_token=' + encodeURIComponent(resp.next_page_token) },
        'none among the tasks looked at so far; look further')
      : 'empty'))]);
}

async function poll(url, every, draw, onError) {
  try {
    draw(await getJSON(url));
  } catch (err) {
    onError(err);
  } finally {
    setTimeout(() => poll(url, every, draw, onError), every);
  }
}

document.addEventListener('DOMContentLoaded', () => {
  poll('/api/snapshot?points=300', 1000, render, (err) => {
    $('problems').replaceChildren(el('li', {}, 'dashboard: ' + err.message));
  });
  poll('/api/tasks?state=DEAD_LETTER&limit=50', 5000, renderDLQ, (err) => {
    $('dlq-caption').textContent = '(' + err.message + ')';
  });
});
