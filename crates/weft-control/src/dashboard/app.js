// weft dashboard: plain JavaScript, no libraries, no outside requests. Reads the control
// plane's JSON API (docs/dashboard.md) and polls it every few seconds.
'use strict';

const POLL_MS = 5000;
const $ = (s) => document.querySelector(s);
const esc = (s) => String(s ?? '').replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
const fmt = {
  rps: (v) => (v == null ? '-' : v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2)),
  pct: (v) => (v == null ? '-' : (v * 100).toFixed(v >= 0.9995 || v < 0.0005 ? 0 : 1) + '%'),
  ms: (v) => (v == null ? '-' : (v >= 100 ? v.toFixed(0) : v.toFixed(1)) + 'ms'),
  num: (v) => (v == null ? '-' : Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(2)),
};
const COLORS = { ok: '#1f9d55', warn: '#d98e04', bad: '#d62d20', muted: '#9ca3af' };
const health = (sr) => (sr == null ? 'muted' : sr >= 0.99 ? 'ok' : sr >= 0.95 ? 'warn' : 'bad');

async function getJSON(url) {
  const r = await fetch(url, { cache: 'no-store' });
  if (!r.ok) {
    const e = new Error(url + ' answered ' + r.status);
    e.status = r.status;
    throw e;
  }
  return r.json();
}

const win = () => $('#window').value;

// ---- routing ---------------------------------------------------------------------------

function route() {
  const h = decodeURIComponent(location.hash.replace(/^#/, '')) || 'graph';
  const [view, ...rest] = h.split('/');
  return { view, rest };
}

function show(view) {
  for (const s of document.querySelectorAll('.view')) s.hidden = s.id !== 'view-' + view;
  for (const a of document.querySelectorAll('nav a[data-view]')) a.classList.toggle('active', a.dataset.view === view);
}

async function refresh() {
  const { view, rest } = route();
  try {
    if (view === 'service') {
      show('detail');
      await renderService(rest.join('/'));
    } else if (view === 'workload') {
      show('detail');
      await renderWorkload(rest[0], rest.slice(1).join('/'));
    } else {
      const v = ['graph', 'services', 'workloads', 'proxies', 'slos'].includes(view) ? view : 'graph';
      show(v);
      await { graph: renderGraph, services: renderServices, workloads: renderWorkloads, proxies: renderProxies, slos: renderSlos }[v]();
    }
    $('#status').textContent = 'updated ' + new Date().toLocaleTimeString();
    document.body.dataset.updated = String(Date.now());
  } catch (e) {
    $('#status').textContent = 'error: ' + e.message;
  }
}

// ---- service graph ---------------------------------------------------------------------

function layout(g, width) {
  const ids = new Set(g.nodes.map((n) => n.id));
  const depth = new Map(g.nodes.map((n) => [n.id, 0]));
  const edges = g.edges.filter((e) => ids.has(e.source) && ids.has(e.target));
  // Longest path from the callers, bounded by the node count (a cycle stops growing).
  for (let round = 0; round < ids.size; round++) {
    let changed = false;
    for (const e of edges) {
      const d = depth.get(e.source) + 1;
      if (d > depth.get(e.target) && d < ids.size) {
        depth.set(e.target, d);
        changed = true;
      }
    }
    if (!changed) break;
  }
  const columns = [];
  for (const n of g.nodes) {
    const d = depth.get(n.id);
    (columns[d] = columns[d] || []).push(n);
  }
  const order = { unknown: 0, ingress: 1, workload: 2, service: 3, egress: 4, external: 5 };
  const colW = Math.max(250, (width - 160) / Math.max(1, columns.length - 1));
  const rowH = 88;
  const pos = new Map();
  let height = 200;
  columns.forEach((col, c) => {
    col = col || [];
    col.sort((a, b) => order[a.kind] - order[b.kind] || a.name.localeCompare(b.name));
    col.forEach((n, r) => pos.set(n.id, { x: 80 + c * colW, y: 60 + r * rowH }));
    height = Math.max(height, 60 + col.length * rowH);
  });
  return { pos, width: Math.max(width, 160 + (columns.length - 1) * colW), height, edges };
}

function nodeSvg(n, p) {
  const label = `<text x="0" y="4" text-anchor="middle">${esc(n.name)}</text>`;
  let shape;
  if (n.kind === 'unknown') shape = '<circle r="22"/>';
  else if (n.kind === 'service' || n.kind === 'external') shape = '<polygon points="-62,0 -48,-18 48,-18 62,0 48,18 -48,18"/>';
  else shape = '<rect x="-62" y="-17" width="124" height="34" rx="6"/>';
  return `<g class="node ${esc(n.kind)}" data-id="${esc(n.id)}" data-kind="${esc(n.kind)}" data-name="${esc(n.name)}" data-namespace="${esc(n.namespace)}" transform="translate(${p.x},${p.y})">${shape}${label}</g>`;
}

// A small padlock drawn in SVG (no emoji font needed): the edge is mutual TLS.
const lockSvg = (x, y) => `<g class="lock" transform="translate(${x},${y})"><path d="M-2.5,-3 v-2 a2.5,2.5 0 0 1 5,0 v2" fill="none" stroke="#374151" stroke-width="1.3"/><rect x="-3.5" y="-3" width="7" height="6" rx="1" fill="#374151"/></g>`;

function edgeSvg(e, a, b, i) {
  const x1 = a.x + 62, y1 = a.y, x2 = b.x - 66, y2 = b.y;
  const mx = (x1 + x2) / 2;
  const color = COLORS[health(e.success_rate)];
  const lx = mx, ly = (y1 + y2) / 2 - 7 + (y1 === y2 ? 0 : i % 2 ? 8 : -2);
  const lock = e.mtls ? lockSvg(lx - 48, ly - 4) : '';
  return `<g class="edge" data-source="${esc(e.source)}" data-target="${esc(e.target)}" data-rps="${e.rps}" data-requests="${e.requests}" data-errors="${e.errors}" data-success="${e.success_rate ?? ''}" data-p50="${e.p50_ms ?? ''}" data-p99="${e.p99_ms ?? ''}" data-mtls="${e.mtls}">` +
    `<path d="M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}" stroke="${color}" marker-end="url(#arrow-${health(e.success_rate)})"/>` +
    `<title>${esc(e.source)} → ${esc(e.target)}: ${fmt.rps(e.rps)} requests/s, success ${fmt.pct(e.success_rate)}, p50 ${fmt.ms(e.p50_ms)}, p99 ${fmt.ms(e.p99_ms)}${e.mtls ? ', mutual TLS' : ''}</title>` +
    lock + `<text class="label" x="${lx}" y="${ly}" text-anchor="middle">${fmt.rps(e.rps)}/s · <tspan class="${health(e.success_rate)}">${fmt.pct(e.success_rate)}</tspan></text>` +
    `<text class="label small" x="${lx}" y="${ly + 12}" text-anchor="middle">p50 ${fmt.ms(e.p50_ms).replace('ms', '')} p99 ${fmt.ms(e.p99_ms)}</text></g>`;
}

async function renderGraph() {
  const [g, d] = await Promise.all([getJSON('/api/v1/graph?window=' + win()), getJSON('/api/v1/denials?window=' + win())]);
  const svg = $('#graph');
  const room = svg.parentElement.clientWidth || 1000;
  const L = layout(g, room);
  // A mesh wider than the page is drawn smaller (down to 70%), then scrolls.
  const scale = Math.max(0.7, Math.min(1, room / L.width));
  svg.setAttribute('viewBox', `0 0 ${L.width} ${L.height}`);
  svg.style.width = L.width * scale + 'px';
  svg.style.height = L.height * scale + 'px';
  const markers = Object.entries(COLORS).map(([k, c]) =>
    `<marker id="arrow-${k}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="${c}"/></marker>`).join('');
  const edges = L.edges.map((e, i) => edgeSvg(e, L.pos.get(e.source), L.pos.get(e.target), i)).join('');
  const nodes = g.nodes.map((n) => nodeSvg(n, L.pos.get(n.id))).join('');
  svg.innerHTML = `<defs>${markers}</defs>${edges}${nodes}` + (g.nodes.length ? '' : '<text x="20" y="30">No proxies connected and no traffic seen yet.</text>');
  for (const el of svg.querySelectorAll('g.node')) {
    el.addEventListener('click', () => {
      const k = el.dataset.kind;
      if (k === 'service' || k === 'external') location.hash = 'service/' + el.dataset.id.replace(/^svc:/, '');
      else if (k !== 'unknown') location.hash = 'workload/' + el.dataset.namespace + '/' + el.dataset.name;
    });
  }
  $('#denials').innerHTML = denialsHtml(d.denials);
}

function denialsHtml(list) {
  if (!list || !list.length) return '<span class="muted">none in this window</span>';
  return '<table><tr><th>caller</th><th>service</th><th>403s</th></tr>' + list.map((x) =>
    `<tr><td>${esc(x.source_workload)}.${esc(x.source_namespace)}</td><td>${esc(x.destination_service)}</td><td>${fmt.num(x.count)}</td></tr>`).join('') +
    '</table><p class="muted">403s answered by the destination\'s proxy with no response flag (authorization denials; an application\'s own 403s look the same).</p>';
}

// ---- tables ----------------------------------------------------------------------------

function signalsCells(s) {
  return `<td>${fmt.rps(s.rps)}</td><td class="${health(s.success_rate)}">${fmt.pct(s.success_rate)}</td><td>${fmt.ms(s.p50_ms)}</td><td>${fmt.ms(s.p99_ms)}</td>`;
}
const SIGNALS_HEAD = '<th>rps</th><th>success</th><th>p50</th><th>p99</th>';

function clickableRows(table) {
  for (const tr of table.querySelectorAll('tr[data-href]')) tr.addEventListener('click', () => { location.hash = tr.dataset.href; });
}

async function renderServices() {
  const d = await getJSON('/api/v1/services?window=' + win());
  const t = $('#services-table');
  t.innerHTML = `<tr><th>service</th>${SIGNALS_HEAD}</tr>` + d.services.map((s) =>
    `<tr class="clickable" data-href="service/${esc(s.name)}"><td>${esc(s.name)}</td>${signalsCells(s)}</tr>`).join('');
  clickableRows(t);
}

async function renderWorkloads() {
  const d = await getJSON('/api/v1/workloads?window=' + win());
  const t = $('#workloads-table');
  t.innerHTML = `<tr><th>workload</th><th>namespace</th><th>instances</th>${SIGNALS_HEAD}</tr>` + d.workloads.map((w) =>
    `<tr class="clickable" data-href="workload/${esc(w.namespace)}/${esc(w.name)}"><td>${esc(w.name)}</td><td>${esc(w.namespace)}</td><td>${w.instances.length}</td>${signalsCells(w)}</tr>`).join('');
  clickableRows(t);
}

async function renderProxies() {
  const d = await getJSON('/api/v1/proxies');
  const types = ['CDS', 'LDS', 'EDS', 'RDS'];
  const t = $('#proxies-table');
  t.innerHTML = `<tr><th>proxy</th><th>namespace</th><th>mode</th>${types.map((x) => `<th>${x}</th>`).join('')}<th>config age</th></tr>` +
    d.proxies.map((p) => {
      const ages = Object.values(p.types || {}).map((s) => s.config_age_seconds).filter((a) => a != null);
      const cells = types.map((k) => {
        const s = (p.types || {})[k];
        return s ? `<td class="status-${esc(s.status)}" title="${esc(s.nack || '')}">${esc(s.status)}</td>` : '<td class="muted">-</td>';
      }).join('');
      return `<tr><td title="${esc(p.id)}">${esc(p.name || p.id)}</td><td>${esc(p.namespace)}</td><td>${esc(p.mode)}</td>${cells}<td>${ages.length ? Math.round(Math.min(...ages)) + 's' : '-'}</td></tr>`;
    }).join('');
}

// ---- SLOs (GET /api/v1/slos; absent on a control plane without the SLO engine) ------------

async function fetchSlos() {
  try {
    return (await getJSON('/api/v1/slos')).slos || [];
  } catch (e) {
    if (e.status === 404) return null;
    throw e;
  }
}

function slosHtml(slos) {
  if (slos == null) return '<p class="muted">No SLOs on this control plane (GET /api/v1/slos answered 404).</p>';
  if (!slos.length) return '<p class="muted">No ServiceLevelObjectives defined.</p>';
  const burnKeys = ['5m', '30m', '1h', '6h', '3d'];
  return `<table id="slo-table"><tr><th>SLO</th><th>service</th><th>SLI</th><th>target</th><th>window</th><th>SLI now</th><th>budget left</th>${burnKeys.map((k) => `<th>burn ${k}</th>`).join('')}<th>alerts</th></tr>` +
    slos.map((s) => {
      const left = s.budget_remaining;
      const bar = left == null ? '' : `<span class="bar" style="width:${Math.max(0, Math.min(1, left)) * 80}px;background:${left > 0.25 ? COLORS.ok : left > 0 ? COLORS.warn : COLORS.bad}"></span> `;
      const alerts = (s.alerts || []).map((a) => `<div class="${a.firing ? 'firing' : 'muted'}">${esc(a.severity)} ${esc(a.long)}/${esc(a.short)} ×${a.factor}${a.firing ? ' FIRING' + (a.since ? ' since ' + esc(a.since) : '') : ''}</div>`).join('');
      return `<tr class="slo" data-name="${esc(s.name)}"><td>${esc(s.namespace)}/${esc(s.name)}</td><td>${esc(s.service)}</td><td>${esc(s.sli)}</td><td>${fmt.pct(s.target)}</td><td>${esc(s.window)}</td><td>${s.sli_value == null ? '-' : fmt.pct(s.sli_value)}</td><td>${bar}${left == null ? '-' : fmt.pct(left)}</td>` +
        burnKeys.map((k) => `<td>${fmt.num((s.burn_rates || {})[k])}</td>`).join('') + `<td>${alerts}</td></tr>`;
    }).join('') + '</table>';
}

async function renderSlos() {
  $('#slos').innerHTML = slosHtml(await fetchSlos());
}

// ---- detail pages ------------------------------------------------------------------------

function chart(svg, points, lines) {
  const W = 420, H = 160, left = 44, bottom = 18;
  svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
  const ts = points.map((p) => p.t);
  let max = 0;
  for (const p of points) for (const l of lines) if (p[l.key] != null && p[l.key] > max) max = p[l.key];
  if (max <= 0) max = 1;
  const span = ts.length > 1 ? ts[ts.length - 1] - ts[0] : 1;
  const x = (t) => left + ((W - left - 6) * (ts.length > 1 ? t - ts[0] : span / 2)) / span;
  const y = (v) => H - bottom - ((H - bottom - 8) * v) / max;
  let out = `<line class="axis" x1="${left}" y1="${H - bottom}" x2="${W - 4}" y2="${H - bottom}"/><line class="axis" x1="${left}" y1="6" x2="${left}" y2="${H - bottom}"/>` +
    `<text x="2" y="14">${fmt.num(max)}</text><text x="2" y="${H - bottom}">0</text>`;
  if (ts.length) {
    const tl = (t) => new Date(t * 1000).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    out += `<text x="${left}" y="${H - 3}">${tl(ts[0])}</text><text x="${W - 4}" y="${H - 3}" text-anchor="end">${tl(ts[ts.length - 1])}</text>`;
  }
  for (const l of lines) {
    const pts = points.filter((p) => p[l.key] != null).map((p) => `${x(p.t).toFixed(1)},${y(p[l.key]).toFixed(1)}`).join(' ');
    out += `<polyline points="${pts}" stroke="${l.color}"><title>${esc(l.key)}</title></polyline>`;
    // Dots too, so a lone point (one step with traffic) is visible.
    out += points.filter((p) => p[l.key] != null && (l.key !== 'rps' || p.rps > 0)).map((p) => `<circle cx="${x(p.t).toFixed(1)}" cy="${y(p[l.key]).toFixed(1)}" r="1.8" fill="${l.color}"/>`).join('');
  }
  svg.innerHTML = out;
}

function charts(points) {
  chart($('#chart-rps'), points, [{ key: 'rps', color: '#2f5fd0' }]);
  chart($('#chart-errors'), points, [{ key: 'error_rps', color: COLORS.bad }]);
  chart($('#chart-latency'), points, [{ key: 'p50_ms', color: '#2f5fd0' }, { key: 'p99_ms', color: COLORS.warn }]);
}

function totalsHtml(label, s) {
  return `<p><b>${esc(label)}</b>: ${fmt.rps(s.rps)} rps, success <span class="${health(s.success_rate)}">${fmt.pct(s.success_rate)}</span>, p50 ${fmt.ms(s.p50_ms)}, p99 ${fmt.ms(s.p99_ms)} (${Math.round(s.requests)} requests in the last ${Math.round((s.covered_seconds ?? 0))}s)</p>`;
}

function edgesTable(edges) {
  const t = $('#detail-edges');
  t.innerHTML = `<tr><th>caller</th><th>service</th><th>workload</th><th>version</th><th>mTLS</th>${SIGNALS_HEAD}</tr>` + edges.map((e) =>
    `<tr><td>${esc(e.source_workload)}.${esc(e.source_namespace)}</td><td>${esc(e.destination_service)}</td><td>${esc(e.destination_workload)}</td><td>${esc(e.destination_version)}</td><td>${e.mtls ? 'yes' : 'no'}</td>${signalsCells(e)}</tr>`).join('');
}

function configHtml(c) {
  const block = (title, list) => `<h3>${title}</h3>` + (list.length ? list.map((r) =>
    `<details><summary>${esc(r.kind)} ${esc(r.namespace)}/${esc(r.name)} <span class="muted">${esc(r.source)}</span></summary><pre>${esc(JSON.stringify(r.spec, null, 2))}</pre></details>`).join('') : '<p class="muted">none</p>');
  return block('VirtualServices', c.virtual_services) + block('DestinationRules', c.destination_rules) + block('AuthorizationPolicies', c.authorization_policies);
}

async function renderService(name) {
  const [d, slos] = await Promise.all([getJSON('/api/v1/services/' + encodeURIComponent(name) + '?window=' + win()), fetchSlos().catch(() => null)]);
  $('#detail-title').textContent = 'Service ' + d.name;
  const mine = (slos || []).filter((s) => s.service === d.name);
  $('#detail-totals').innerHTML = totalsHtml('served (destination proxies)', d.totals) + totalsHtml('as callers saw it (source proxies)', d.callers_totals) +
    (mine.length ? '<h3>SLOs</h3>' + slosHtml(mine) : '');
  charts(d.series.some((p) => p.rps > 0) ? d.series : d.callers_series);
  edgesTable(d.edges);
  $('#detail-config').innerHTML = configHtml(d.config);
  $('#detail-denials').innerHTML = denialsHtml(d.denials);
}

async function renderWorkload(ns, name) {
  const d = await getJSON('/api/v1/workloads/' + encodeURIComponent(ns) + '/' + encodeURIComponent(name) + '?window=' + win());
  $('#detail-title').textContent = 'Workload ' + d.namespace + '/' + d.name;
  $('#detail-totals').innerHTML = totalsHtml('inbound', d.inbound_totals) + totalsHtml('outbound', d.outbound_totals) +
    `<p class="muted">proxies: ${d.proxies.map((p) => esc(p.name)).join(', ') || 'none connected'}</p>`;
  charts(d.inbound_series.some((p) => p.rps > 0) ? d.inbound_series : d.outbound_series);
  edgesTable(d.edges);
  $('#detail-config').innerHTML = '';
  $('#detail-denials').innerHTML = denialsHtml(d.denials);
}

// ---- start -------------------------------------------------------------------------------

window.addEventListener('hashchange', refresh);
$('#window').addEventListener('change', refresh);
const initial = new URLSearchParams(location.search).get('window');
if (initial && [...$('#window').options].some((o) => o.value === initial)) $('#window').value = initial;
refresh();
setInterval(refresh, POLL_MS);
