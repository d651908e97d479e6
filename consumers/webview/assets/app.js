// flowstat serve's page. Everything from the stream or the database is put into text nodes
// (textContent), never parsed as HTML. The page writes what it rendered into data- attributes
// (data-points on the charts, data-first-flow-ms, data-charts-ms and data-ready-ms on <body>), so a
// headless browser can check it and time it.
'use strict';
(function () {
  const MAX_ROWS = 500; // the table keeps the newest rows only: memory stays bounded
  const params = new URLSearchParams(location.search);
  const liveKeys = ['host', 'direction', 'port', 'name', 'addr', 'process', 'cgroup', 'container'];
  const chartKeys = ['host', 'direction'];
  const body = document.body;
  const $ = (id) => document.getElementById(id);

  // The form shows the filters in effect.
  const form = $('filters');
  for (const [k, v] of params) {
    const input = form.elements.namedItem(k);
    if (input) input.value = v;
  }
  if (params.get('process')) $('process-note').hidden = false;
  const since = params.get('since') || '1h';
  const by = params.get('by') || 'peer';
  const sinceSeconds = (() => { const m = /^(\d+)([mh])$/.exec(since); return m ? Number(m[1]) * (m[2] === 'h' ? 3600 : 60) : 3600; })();
  $('top-by').textContent = by;

  function mark(name) {
    const key = name + 'Ms';
    if (!(key in body.dataset)) body.dataset[key] = performance.now().toFixed(1);
    if ('firstFlowMs' in body.dataset && 'chartsMs' in body.dataset && !('readyMs' in body.dataset)) {
      body.dataset.readyMs = performance.now().toFixed(1);
    }
  }

  function td(text) {
    const c = document.createElement('td');
    c.textContent = text;
    c.title = text;
    return c;
  }
  function endpoint(a, p) { return (a.includes(':') ? '[' + a + ']' : a) + ':' + p; }
  function fmtTime(ns) {
    const ms = Math.floor(Number(ns) / 1e6);
    return new Date(ms).toISOString().replace('T', ' ').replace('Z', '');
  }

  // Live flows: rows queue up and are added at most every 100 ms, newest on top; while the table
  // is empty (the recent flows the stream sends first), at once.
  let shown = 0, pending = [], timer = 0, stats = null;
  const tbody = $('flows').tBodies[0];
  function flush() {
    timer = 0;
    const frag = document.createDocumentFragment();
    for (let i = pending.length - 1; i >= 0; i--) frag.appendChild(pending[i]);
    pending = [];
    tbody.insertBefore(frag, tbody.firstChild);
    while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(-1);
    body.dataset.rows = String(tbody.rows.length);
    counts();
    if (tbody.rows.length > 0) mark('firstFlow');
  }
  function counts() {
    let t = shown + ' shown';
    if (stats) {
      t += ' · ' + stats.dropped + ' dropped (browser too slow)';
      t += ' · ' + stats.rate_limited + ' over the rate limit';
    }
    $('counts').textContent = t;
    if (stats) {
      body.dataset.dropped = String(stats.dropped);
      body.dataset.rateLimited = String(stats.rate_limited);
    }
  }
  function addFlow(ev) {
    const tr = document.createElement('tr');
    tr.className = 'flow ' + (ev.conn_direction === 'incoming' ? 'incoming' : 'outgoing');
    tr.dataset.srcPort = String(ev.src_port);
    tr.dataset.dstPort = String(ev.dst_port);
    const ctx = [];
    if (ev.cgroup_id) ctx.push('cgroup ' + ev.cgroup_id);
    if (ev.container_id) ctx.push(ev.container_id.slice(0, 12));
    if (ev.comm) ctx.push(ev.comm + (ev.pid ? '[' + ev.pid + ']' : ''));
    tr.append(td(fmtTime(ev.timestamp)), td(ev.host), td(ev.conn_direction),
      td(endpoint(ev.src, ev.src_port)), td(endpoint(ev.dst, ev.dst_port)),
      td((ev.src_dns || []).join(', ') || '-'), td((ev.dst_dns || []).join(', ') || '-'), td(ctx.join(' ') || '-'));
    pending.push(tr);
    if (pending.length > MAX_ROWS) pending.shift();
    shown++;
    if (!timer) timer = setTimeout(flush, tbody.rows.length === 0 ? 0 : 100);
  }
  function setStatus(text, bad) {
    const s = $('status');
    s.textContent = text;
    s.className = 'status' + (bad ? ' bad' : '');
  }

  const liveQuery = new URLSearchParams();
  for (const k of liveKeys) if (params.get(k)) liveQuery.set(k, params.get(k));
  const es = new EventSource('/api/live?' + liveQuery.toString());
  es.addEventListener('hello', (e) => {
    mark('hello');
    const h = JSON.parse(e.data);
    setStatus('live' + (h.filter ? ' · filter ' + h.filter : ''), false);
    if (h.history === 0) mark('firstFlow'); // nothing recent to show: the table is as complete as it gets
  });
  es.addEventListener('flow', (e) => addFlow(JSON.parse(e.data)));
  es.addEventListener('stats', (e) => {
    stats = JSON.parse(e.data);
    counts();
    if (stats.status) setStatus(stats.status, true);
    else setStatus('live · ' + stats.feed_events + ' events read', false);
  });
  es.onerror = () => setStatus('disconnected from flowstat serve; reconnecting…', true);
  // A page left for another (or kept in the back/forward cache) gives its stream back: the browser's
  // few connections per server, and the server's live view slots, are not held by pages nobody sees.
  addEventListener('pagehide', () => es.close());
  addEventListener('pageshow', (e) => { if (e.persisted) location.reload(); }); // back to a closed stream

  // Charts from the database.
  const palette = ['#2563eb', '#dc2626', '#059669', '#d97706', '#7c3aed', '#0891b2', '#db2777', '#4b5563'];
  const charts = {};
  function chartWidth(el) { return Math.max(300, el.clientWidth - 4); }
  function empty(el, text) {
    if (charts[el.id]) { charts[el.id].destroy(); delete charts[el.id]; }
    el.replaceChildren();
    const d = document.createElement('div');
    d.className = 'empty';
    d.textContent = text;
    el.appendChild(d);
  }
  function draw(el, opts, data) {
    if (charts[el.id]) { charts[el.id].destroy(); }
    el.replaceChildren();
    charts[el.id] = new uPlot(opts, data, el);
  }
  async function getJSON(path) {
    const r = await fetch(path, { cache: 'no-store' });
    const t = await r.text();
    if (!r.ok) throw new Error(t.trim());
    return JSON.parse(t);
  }

  async function hostsChart() {
    const el = $('chart-hosts');
    const q = new URLSearchParams({ since });
    for (const k of chartKeys) if (params.get(k)) q.set(k, params.get(k));
    const res = await getJSON('/api/hosts?' + q);
    const pts = res.points || [];
    el.dataset.points = String(pts.length);
    if (pts.length === 0) { empty(el, 'no connections in the database for this range'); return; }
    const xs = [...new Set(pts.map((p) => Date.parse(p.start) / 1000))].sort((a, b) => a - b);
    const hosts = [...new Set(pts.map((p) => p.host))].sort();
    const idx = new Map(xs.map((x, i) => [x, i]));
    const ys = hosts.map(() => xs.map(() => 0));
    for (const p of pts) ys[hosts.indexOf(p.host)][idx.get(Date.parse(p.start) / 1000)] = p.connections;
    draw(el, {
      width: chartWidth(el), height: 220,
      // The whole range asked for, so that a single bucket is not stretched over years.
      scales: { x: { time: true, range: () => { const now = Date.now() / 1000; return [now - sinceSeconds, now]; } }, y: { range: (u, lo, hi) => [0, Math.max(1, hi * 1.1)] } },
      series: [{}].concat(hosts.map((h, i) => ({ label: h, stroke: palette[i % palette.length], width: 2, points: { show: xs.length < 3 } }))),
      axes: [{}, { label: 'connections', size: 60 }],
    }, [xs].concat(ys));
  }

  async function topChart() {
    const el = $('chart-top');
    const q = new URLSearchParams({ since, by, limit: '10' });
    for (const k of chartKeys) if (params.get(k)) q.set(k, params.get(k));
    const res = await getJSON('/api/top?' + q);
    const rows = res.rows || [];
    el.dataset.points = String(rows.length);
    const tb = $('top-table').tBodies[0];
    tb.replaceChildren(...rows.map((r, i) => {
      const tr = document.createElement('tr');
      tr.append(td(String(i + 1)), td(r.key), td(r.name || '-'), td(String(r.connections)));
      return tr;
    }));
    if (rows.length === 0) { empty(el, 'no connections in the database for this range'); return; }
    const labels = rows.map((r) => r.name ? r.name : r.key);
    draw(el, {
      width: chartWidth(el), height: 220,
      scales: { x: { time: false, range: [-0.5, rows.length - 0.5] }, y: { range: (u, lo, hi) => [0, Math.max(1, hi * 1.1)] } },
      series: [{}, { label: 'connections', fill: '#2563eb88', stroke: '#2563eb', paths: uPlot.paths.bars({ size: [0.7, 60] }), points: { show: false } }],
      axes: [{ splits: () => rows.map((_, i) => i), values: (u, splits) => splits.map((i) => { const l = labels[i] || ''; return l.length > 16 ? l.slice(0, 15) + '…' : l; }), rotate: 0 },
        { label: 'connections', size: 60 }],
      legend: { show: false },
    }, [rows.map((_, i) => i), rows.map((r) => r.connections)]);
  }

  async function refreshCharts() {
    const results = await Promise.allSettled([hostsChart(), topChart()]);
    for (const [r, id] of results.map((r, i) => [r, ['chart-hosts', 'chart-top'][i]])) {
      if (r.status === 'rejected') { empty($(id), 'chart unavailable: ' + r.reason.message); $(id).dataset.error = r.reason.message; }
    }
    mark('charts');
  }
  refreshCharts();
  setInterval(refreshCharts, 15000);
})();
