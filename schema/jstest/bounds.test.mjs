// Tests of flowbus.mjs on its own (node --test): every string bound of FORMAT.md decoding rule 4, at
// the bound and one past it, in bytes as on the wire; prev_run (schema 1.1); bin never passes for a
// string; end batches (schema 2.0): read by decodeEndBatch with the same bounds, refused by decodeBatch;
// ctx uid (1.2 / 2.1). schema/jstest's Go test runs this file.
import { strict as assert } from "node:assert";
import { readdirSync, readFileSync } from "node:fs";
import { test } from "node:test";
import { encode } from "@msgpack/msgpack";
import { BOUNDS, decodeBatch, decodeEndBatch } from "./flowbus.mjs";

function base() {
  return {
    schema_major: 1, schema_minor: 1, host: "h", conn_direction: "incoming", run_id: "r", seq: 5, prev_seq: 0,
    t0: 1000, drops: { queue: 2 },
    endpoints: [["10.0.0.1", []], ["2001:db8::1", ["x.example"]]],
    ctx: [{ pid: 7, comm: "curl" }],
    events: [[1, 0, 40000, 443, -5, 0]],
    prev_run: { run_id: "old", last_seq: 9, batches: 5, events: 70, last_ns: 1000, start_ns: -3, end: "stopped" },
  };
}

const s = (n, c = "x") => c.repeat(n);

// Each case sets one string of n bytes; the error past the bound names where.
const cases = [
  { name: "host", bound: BOUNDS.host, where: "host", set: (b, v) => { b.host = v; } },
  { name: "run_id", bound: BOUNDS.run_id, where: "run_id", set: (b, v) => { b.run_id = v; } },
  { name: "conn_direction", bound: BOUNDS.direction, where: "conn_direction", set: (b, v) => { b.conn_direction = v; }, atBoundInvalid: true },
  { name: "address", bound: BOUNDS.addr, where: "endpoints[0][0]", set: (b, v) => { b.endpoints[0][0] = v; } },
  { name: "dns name", bound: BOUNDS.dns_name, where: "endpoints[1][1][0]", set: (b, v) => { b.endpoints[1][1][0] = v; } },
  { name: "comm", bound: BOUNDS.comm, where: "ctx[0].comm", set: (b, v) => { b.ctx[0].comm = v; } },
  { name: "container_id", bound: BOUNDS.container_id, where: "ctx[0].container_id", set: (b, v) => { b.ctx[0].container_id = v; } },
  { name: "prev_run.run_id", bound: BOUNDS.run_id, where: "prev_run.run_id", set: (b, v) => { b.prev_run.run_id = v; } },
  { name: "prev_run.end", bound: BOUNDS.run_end, where: "prev_run.end", set: (b, v) => { b.prev_run.end = v; } },
];

const keyCases = [
  { name: "unknown top-level key", set: (b, k) => { b[k] = 1; } },
  { name: "unknown drops key", set: (b, k) => { b.drops[k] = 1; } },
  { name: "unknown ctx key", set: (b, k) => { b.ctx[0][k] = 1; } },
  { name: "unknown prev_run key", set: (b, k) => { b.prev_run[k] = 1; } },
  { name: "key of a map nested in an unknown value", set: (b, k) => { b.future = [{ [k]: 1 }]; } },
  { name: "key of a map in an extra row element", set: (b, k) => { b.events[0].push({ [k]: 1 }); } },
];

function batchWith(set, v) {
  const b = base();
  set(b, v);
  return encode(b);
}

const tooLong = (bound, where, n = bound + 1) =>
  new RegExp(`malformed flowbus batch: ${where.replace(/[[\].]/g, "\\$&")} is a string of ${n} bytes, longer than the bound of ${bound}`);

for (const c of cases) {
  test(`${c.name}: ${c.bound} bytes pass, ${c.bound + 1} are malformed`, () => {
    if (c.atBoundInvalid) {
      // No direction is that long: it passes the bound and fails as an unknown direction.
      assert.throws(() => decodeBatch(batchWith(c.set, s(c.bound))), /conn_direction is "x{16}"/);
    } else {
      assert.equal(decodeBatch(batchWith(c.set, s(c.bound))) !== null, true);
    }
    assert.throws(() => decodeBatch(batchWith(c.set, s(c.bound + 1))), tooLong(c.bound, c.where));
  });
}

for (const c of keyCases) {
  test(`${c.name}: ${BOUNDS.key} bytes pass, ${BOUNDS.key + 1} are malformed`, () => {
    decodeBatch(batchWith(c.set, s(BOUNDS.key, "k")));
    assert.throws(() => decodeBatch(batchWith(c.set, s(BOUNDS.key + 1, "k"))),
      /malformed flowbus batch: map key is a string of 65 bytes, longer than the bound of 64/);
  });
}

test("bounds count bytes on the wire, not UTF-16 units", () => {
  const b = decodeBatch(batchWith((x, v) => { x.host = v; }, s(32, "é"))); // 64 bytes, 32 units
  assert.equal(b.host, s(32, "é"));
  assert.throws(() => decodeBatch(batchWith((x, v) => { x.host = v; }, s(33, "é"))), tooLong(64, "host", 66));
  // Invalid UTF-8: 64 bytes 0xff decode to replacement characters (3 bytes each in UTF-8) and still pass;
  // 65 do not.
  for (const [n, ok] of [[64, true], [65, false]]) {
    const data = batchWith((x, v) => { x.host = v; }, s(n, "~"));
    const at = Buffer.from(data).indexOf(Buffer.from(s(n, "~")));
    data.fill(0xff, at, at + n);
    if (ok) decodeBatch(data);
    else assert.throws(() => decodeBatch(data), tooLong(64, "host"));
  }
});

test("a bin is never a string", () => {
  assert.throws(() => decodeBatch(batchWith((x) => { x.host = new Uint8Array([104]); })), /host is bin, want a string/);
  assert.throws(() => decodeBatch(batchWith((x) => { x.prev_run.end = new Uint8Array([1]); })), /prev_run.end is bin, want a string/);
});

test("prev_run decodes, with bigint integers; nil or absent means none", () => {
  const b = decodeBatch(encode(base(), { useBigInt64: true }));
  assert.deepEqual(b.prev_run, { run_id: "old", last_seq: 9n, batches: 5n, events: 70n, last_ns: 1000n, start_ns: -3n, end: "stopped" });
  const none = base();
  delete none.prev_run;
  assert.equal(decodeBatch(encode(none)).prev_run, null);
  none.prev_run = null;
  assert.equal(decodeBatch(encode(none)).prev_run, null);
  const golden = decodeBatch(readFileSync(new URL("../testdata/first_of_run.msgpack", import.meta.url)));
  assert.deepEqual(golden.prev_run, { run_id: "9c1e52f07ab3d446", last_seq: 1841n, batches: 922n, events: 3775118n,
    last_ns: 1763989998071000000n, start_ns: 1763990000142000000n, end: "unknown" });
});

test("prev_run errors: later batch, missing key, empty run id, wrong types", () => {
  const later = base();
  later.prev_seq = 3;
  assert.throws(() => decodeBatch(encode(later)), /prev_run is on a batch with prev_seq 3/);
  for (const [k, v, re] of [
    ["end", undefined, /prev_run.end is missing/],
    ["run_id", "", /prev_run.run_id is empty/],
    ["batches", -1, /prev_run.batches is -1, want a non-negative integer/],
    ["last_ns", 1.5, /prev_run.last_ns is number, want an integer/],
    ["start_ns", true, /prev_run.start_ns is boolean, want an integer/],
    ["end", 7, /prev_run.end is number, want a string/],
  ]) {
    const b = base();
    if (v === undefined) delete b.prev_run[k];
    else b.prev_run[k] = v;
    assert.throws(() => decodeBatch(encode(b)), re, `${k}=${v}`);
  }
  const notMap = base();
  notMap.prev_run = [1];
  assert.throws(() => decodeBatch(encode(notMap)), /prev_run is not a map/);
});

function endBase() {
  const b = base();
  b.schema_major = 2;
  b.schema_minor = 0;
  b.event = "net_flow_tcp_end";
  b.events = [[1, 0, 40000, 443, -5, 0, 100, 10, 20, 1, 2, 0, 250, 1]];
  return b;
}

const testdata = new URL("../testdata/", import.meta.url);
const endVectors = readdirSync(testdata).filter((f) => f.startsWith("end_") && f.endsWith(".msgpack"));

test("end vectors: decodeEndBatch reads them, decodeBatch (a 1.x decoder) refuses each as major 2", () => {
  assert.ok(endVectors.length >= 4, `only ${endVectors.length} end vectors`);
  for (const f of endVectors) {
    const data = readFileSync(new URL(f, testdata));
    const b = decodeEndBatch(data);
    assert.equal(b.event, "net_flow_tcp_end", f);
    assert.ok(b.events.every((e) => e.event === "net_flow_tcp_end" && !("timestamp" in e)), f);
    assert.throws(() => decodeBatch(data), /flowbus batch schema major 2 is not supported by this consumer \(supports 1\): upgrade the consumer/, f);
  }
  assert.throws(() => decodeEndBatch(readFileSync(new URL("outgoing_mixed.msgpack", testdata))), /major 1 is a net_flow_tcp_begin batch/);
});

test("end_mixed decodes exactly: bigint counters, begin_ns = end_ns - duration_ns, reason names", () => {
  const b = decodeEndBatch(readFileSync(new URL("end_mixed.msgpack", testdata)));
  const e = b.events[2];
  assert.equal(e.dst_bytes, 18446744073709551615n);
  assert.equal(e.srtt_us, 4294967295);
  assert.equal(e.reason, "timeout");
  assert.equal(e.end_ns - e.duration_ns, e.begin_ns);
  assert.equal(b.events[0].begin_ns, 1763990000123456789n);
  assert.deepEqual(b.events.map((x) => x.reason), ["fin", "rst_received", "timeout", "rst_sent", "never_established"]);
  const fut = decodeEndBatch(readFileSync(new URL("end_future_minor.msgpack", testdata)));
  assert.equal(fut.events[0].reason, "unknown"); // code 9: a later minor's
});

for (const c of cases) {
  test(`end batch ${c.name}: ${c.bound} bytes pass, ${c.bound + 1} are malformed`, () => {
    const make = (n) => { const b = endBase(); c.set(b, s(n)); return encode(b); };
    if (!c.atBoundInvalid) decodeEndBatch(make(c.bound));
    assert.throws(() => decodeEndBatch(make(c.bound + 1)), tooLong(c.bound, c.where));
  });
}

test(`end batch event: ${BOUNDS.event} bytes are checked for the value, ${BOUNDS.event + 1} are malformed`, () => {
  const b = endBase();
  b.event = s(BOUNDS.event);
  assert.throws(() => decodeEndBatch(encode(b)), /event is "x{32}", want "net_flow_tcp_end"/);
  b.event = s(BOUNDS.event + 1);
  assert.throws(() => decodeEndBatch(encode(b)), tooLong(BOUNDS.event, "event"));
  delete b.event;
  assert.throws(() => decodeEndBatch(encode(b)), /event is undefined, want a string/);
});

test("end rows: length, ranges and types", () => {
  for (const [i, v, re] of [
    [13, 256, /events\[0\]\[13\] \(reason\) is 256, more than 255/],
    [12, 2 ** 32, /events\[0\]\[12\] \(srtt_us\) is 4294967296, more than 4294967295/],
    [7, -1, /events\[0\]\[7\] \(src_bytes\) is -1, want a non-negative integer/],
    [6, "1s", /events\[0\]\[6\] \(duration_ns\) is a string, want an integer/],
  ]) {
    const b = endBase();
    b.events[0][i] = v;
    assert.throws(() => decodeEndBatch(encode(b)), re);
  }
  const short = endBase();
  short.events[0].pop();
  assert.throws(() => decodeEndBatch(encode(short)), /events\[0\] has 13 elements, want at least 14/);
  const extra = endBase();
  extra.events[0].push("future", { k: 1 });
  extra.future = { a: 1 };
  assert.equal(decodeEndBatch(encode(extra)).events.length, 1);
});

test("ctx uid (schema 1.2 / 2.1): a number, 0 is root and kept, absent or nil is unknown, past 2^32-1 malformed", () => {
  for (const decode of [(b) => decodeBatch(encode(b)), (b) => decodeEndBatch(encode(Object.assign(endBase(), { ctx: b.ctx })))]) {
    for (const [uid, want] of [[0, 0], [33, 33], [2 ** 32 - 1, 2 ** 32 - 1]]) {
      const b = base();
      b.ctx[0].uid = uid;
      const ev = decode(b).events[0];
      assert.equal(ev.uid, want);
      assert.equal(typeof ev.uid, "number");
    }
    for (const absent of [undefined, null]) {
      const b = base();
      if (absent === null) b.ctx[0].uid = null;
      assert.equal("uid" in decode(b).events[0], false);
    }
    const big = base();
    big.ctx[0].uid = 2 ** 32;
    assert.throws(() => decode(big), /ctx\[0\]\.uid is 4294967296, more than 4294967295/);
    const neg = base();
    neg.ctx[0].uid = -1;
    assert.throws(() => decode(neg), /ctx\[0\]\.uid is -1, want a non-negative integer/);
  }
  const golden = decodeBatch(readFileSync(new URL("../testdata/process.msgpack", import.meta.url)));
  assert.deepEqual(golden.events.map((e) => ("uid" in e ? e.uid : "absent")), [33, 0, "absent", 33]);
});
