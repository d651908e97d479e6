// Decodes one flowbus batch (schema 1.x: net_flow_tcp_begin; schema 2.x: net_flow_tcp_end) exactly, as schema/FORMAT.md ("Decoding in JavaScript")
// describes. 64-bit quantities (t0, each timestamp, seq, prev_seq, drops, cgroup_id) come back as
// bigint, everything that fits 32 bits (ports, pid, refs, versions) as number, so every value is exact
// and its type does not depend on its size. Every string is bounded in bytes as on the wire, like the Go
// decoder (FORMAT.md, decoding rule 4).
import { Decoder } from "@msgpack/msgpack";

/** The schema major decodeBatch reads (begin batches). */
export const SUPPORTED_MAJOR = 1;

/** The schema major decodeEndBatch reads (end batches, event net_flow_tcp_end). */
export const END_MAJOR = 2;

/** The event an end batch names. */
export const END_EVENT = "net_flow_tcp_end";

/** End reason names by wire code; a code past them (a later minor) is "unknown". */
export const END_REASONS = Object.freeze(["unknown", "fin", "rst_sent", "rst_received", "timeout", "never_established"]);

/** Bounds on the strings of a batch, in bytes on the wire (schema.MaxHostLen, ... in Go). */
export const BOUNDS = Object.freeze({
  host: 64,
  run_id: 64,
  direction: 16,
  addr: 64,
  dns_name: 253,
  comm: 16,
  container_id: 64,
  run_end: 16, // prev_run.end
  key: 64, // every map key, at any level
  event: 32, // an end batch's event
});

function malformed(where, what) {
  return new Error(`malformed flowbus batch: ${where} ${what}`);
}

// WireStr is a msgpack string with its length in bytes as encoded: the bounds are in bytes, and the
// JavaScript text of invalid UTF-8 does not tell how many bytes it came from.
class WireStr {
  constructor(text, bytes) {
    this.text = text;
    this.bytes = bytes;
  }
}

// BoundedDecoder refuses a map key past its bound before decoding it, and returns every other string as
// a WireStr. A msgpack bin stays a Uint8Array, so it can never pass for a string.
class BoundedDecoder extends Decoder {
  decodeString(byteLength, headerOffset) {
    if (this.stateIsMapKey()) {
      if (byteLength > BOUNDS.key) {
        throw malformed("map key", `is a string of ${byteLength} bytes, longer than the bound of ${BOUNDS.key}`);
      }
      return super.decodeString(byteLength, headerOffset);
    }
    return new WireStr(super.decodeString(byteLength, headerOffset), byteLength);
  }
}

const decoder = new BoundedDecoder({ useBigInt64: true });

function kind(v) {
  if (v === null) return "nil";
  if (v instanceof WireStr) return "a string";
  if (v instanceof Uint8Array) return "bin";
  return typeof v;
}

// With useBigInt64 a msgpack int64/uint64 decodes to bigint and a smaller encoding to number, so the
// same field can be either: this makes it a bigint.
function big(v, where) {
  if (typeof v === "bigint") return v;
  if (Number.isInteger(v)) return BigInt(v); // exact: numbers only come from encodings of <= 32 bits
  throw malformed(where, `is ${kind(v)}, want an integer`);
}

function int64(v, where) {
  const b = big(v, where);
  if (b !== BigInt.asIntN(64, b)) throw malformed(where, `is ${b}, which overflows a signed 64-bit integer`);
  return b;
}

function uint64(v, where) {
  const b = big(v, where);
  if (b < 0n) throw malformed(where, `is ${b}, want a non-negative integer`);
  return b;
}

function uintMax(v, max, where) {
  const b = uint64(v, where);
  if (b > BigInt(max)) throw malformed(where, `is ${b}, more than ${max}`);
  return Number(b);
}

function str(v, bound, where) {
  if (!(v instanceof WireStr)) throw malformed(where, `is ${kind(v)}, want a string`);
  if (v.bytes > bound) throw malformed(where, `is a string of ${v.bytes} bytes, longer than the bound of ${bound}`);
  return v.text;
}

function arr(v, where) {
  if (!Array.isArray(v)) throw malformed(where, "is not an array");
  return v;
}

function map(v, where) {
  if (v === null || typeof v !== "object" || Array.isArray(v) || v instanceof Uint8Array || v instanceof WireStr) {
    throw malformed(where, "is not a map");
  }
  return v;
}

const RUN_LINK_KEYS = ["run_id", "last_seq", "batches", "events", "last_ns", "start_ns", "end"];

// runLink decodes prev_run (schema 1.1): every key required, unknown keys ignored.
function runLink(v) {
  const m = map(v, "prev_run");
  for (const k of RUN_LINK_KEYS) {
    if (!(k in m)) throw malformed(`prev_run.${k}`, "is missing");
  }
  const runID = str(m.run_id, BOUNDS.run_id, "prev_run.run_id");
  if (runID === "") throw malformed("prev_run.run_id", "is empty");
  return {
    run_id: runID,
    last_seq: uint64(m.last_seq, "prev_run.last_seq"),
    batches: uint64(m.batches, "prev_run.batches"),
    events: uint64(m.events, "prev_run.events"),
    last_ns: int64(m.last_ns, "prev_run.last_ns"),
    start_ns: int64(m.start_ns, "prev_run.start_ns"),
    end: str(m.end, BOUNDS.run_end, "prev_run.end"),
  };
}

// header decodes the top level both kinds share: everything but the rows, and a function that reads
// the six elements every row starts with.
function header(b) {
  const host = str(b.host, BOUNDS.host, "host");
  const dir = str(b.conn_direction, BOUNDS.direction, "conn_direction");
  if (dir !== "incoming" && dir !== "outgoing") throw malformed("conn_direction", `is ${JSON.stringify(dir)}`);
  const t0 = int64(b.t0, "t0");
  const prevSeq = uint64(b.prev_seq, "prev_seq");
  let prevRun = null;
  if (b.prev_run != null) {
    if (prevSeq !== 0n) {
      throw malformed("prev_run", `is on a batch with prev_seq ${prevSeq}: only the first batch of a direction (prev_seq 0) carries it`);
    }
    prevRun = runLink(b.prev_run);
  }

  const drops = { kernel: 0n, reader: 0n, queue: 0n, spool: 0n, publish: 0n };
  for (const [k, v] of Object.entries(map(b.drops ?? {}, "drops"))) {
    if (k in drops) drops[k] = uint64(v, `drops.${k}`); // unknown stages: a later minor, ignored
  }

  const endpoints = arr(b.endpoints, "endpoints").map((e, i) => {
    arr(e, `endpoints[${i}]`);
    return {
      addr: str(e[0], BOUNDS.addr, `endpoints[${i}][0]`),
      names: arr(e[1], `endpoints[${i}][1]`).map((n, j) => str(n, BOUNDS.dns_name, `endpoints[${i}][1][${j}]`)),
    };
  });
  const ctx = arr(b.ctx ?? [], "ctx").map((c, i) => {
    map(c, `ctx[${i}]`);
    const out = {};
    if (c.cgroup_id != null) out.cgroup_id = uint64(c.cgroup_id, `ctx[${i}].cgroup_id`);
    if (c.pid != null) out.pid = uintMax(c.pid, 0xffffffff, `ctx[${i}].pid`);
    if (c.comm != null) out.comm = str(c.comm, BOUNDS.comm, `ctx[${i}].comm`);
    // Schema 1.2 / 2.1. 0 is root, a value: only an absent (or nil) uid is unknown.
    if (c.uid != null) out.uid = uintMax(c.uid, 0xffffffff, `ctx[${i}].uid`);
    if (c.container_id != null) out.container_id = str(c.container_id, BOUNDS.container_id, `ctx[${i}].container_id`);
    return out;
  });
  const ref = (v, dict, where) => {
    const r = uintMax(v, 0xffffffff, where);
    if (r >= dict.length) throw malformed(where, `is ${r}, outside its dictionary of ${dict.length}`);
    return dict[r];
  };
  // rowStart returns the row's first six elements as an event (with time: t0 + dt_ns in 64-bit two's
  // complement, as the Go decoder computes it) and its process context, if any.
  const rowStart = (row, i, need) => {
    arr(row, `events[${i}]`);
    if (row.length < need) throw malformed(`events[${i}]`, `has ${row.length} elements, want at least ${need}`);
    const src = ref(row[0], endpoints, `events[${i}][0] (src_ref)`);
    const dst = ref(row[1], endpoints, `events[${i}][1] (dst_ref)`);
    return {
      ev: {
        conn_direction: dir,
        src: src.addr,
        dst: dst.addr,
        src_port: uintMax(row[2], 65535, `events[${i}][2] (src_port)`),
        dst_port: uintMax(row[3], 65535, `events[${i}][3] (dst_port)`),
        src_dns: src.names,
        dst_dns: dst.names,
      },
      // Both are bigint here: t0 + row[4] alone throws (bigint + number) or, with a default decode, rounds.
      time: BigInt.asIntN(64, t0 + int64(row[4], `events[${i}][4] (dt_ns)`)),
      ctx: row[5] != null ? ref(row[5], ctx, `events[${i}][5] (ctx_ref)`) : null,
    };
  };
  return {
    top: {
      schema_major: Number(int64(b.schema_major, "schema_major")),
      schema_minor: Number(int64(b.schema_minor, "schema_minor")),
      host,
      conn_direction: dir,
      run_id: str(b.run_id, BOUNDS.run_id, "run_id"),
      seq: uint64(b.seq, "seq"),
      prev_seq: prevSeq,
      prev_run: prevRun,
      t0,
      drops,
    },
    rowStart,
  };
}

/**
 * decodeBatch decodes the body of one flowbus begin batch message (schema 1.x).
 * @param {Uint8Array} data the message body
 * @returns the batch: header fields and events in the shape of SPEC section 1, with bigint
 *   timestamps (unix ns), seq, prev_seq, drops and cgroup_id, and prev_run (null when absent) with bigint
 *   last_seq, batches, events, last_ns and start_ns. An event's process context (cgroup_id, pid, comm,
 *   uid as a number, container_id) has only the keys its ctx entry knows: absent means unknown. An end
 *   batch (major 2) is refused, never read.
 */
export function decodeBatch(data) {
  const b = map(decoder.decode(data), "top level");
  const major = Number(int64(b.schema_major, "schema_major"));
  if (major !== SUPPORTED_MAJOR) {
    const end = major === END_MAJOR ? ` (major ${END_MAJOR} is a ${END_EVENT} batch: decodeEndBatch reads it)` : "";
    throw new Error(`flowbus batch schema major ${major} is not supported by this consumer ` +
      `(supports ${SUPPORTED_MAJOR}): upgrade the consumer${end}`);
  }
  const { top, rowStart } = header(b);
  const events = arr(b.events, "events").map((row, i) => {
    const { ev, time, ctx } = rowStart(row, i, 6);
    ev.timestamp = time;
    ev.host = top.host;
    if (ctx) Object.assign(ev, ctx);
    return ev;
  });
  return { ...top, events };
}

/**
 * decodeEndBatch decodes the body of one flowbus end batch message (schema 2.x, event
 * net_flow_tcp_end), with the same checks and bounds as decodeBatch.
 * @param {Uint8Array} data the message body
 * @returns the batch: header fields (with event) and events in the shape of FORMAT.md "End batches":
 *   bigint begin_ns, end_ns, duration_ns, src_bytes, dst_bytes, src_segs, dst_segs, retrans; number
 *   srtt_us; reason as its name; the process context as in decodeBatch (uid absent when unknown).
 */
export function decodeEndBatch(data) {
  const b = map(decoder.decode(data), "top level");
  const major = Number(int64(b.schema_major, "schema_major"));
  if (major !== END_MAJOR) {
    throw new Error(major === SUPPORTED_MAJOR
      ? `flowbus batch schema major ${major} is a net_flow_tcp_begin batch, not an end batch: decodeBatch reads it`
      : `flowbus end batch schema major ${major} is not supported by this consumer (supports ${END_MAJOR}): upgrade the consumer`);
  }
  const event = str(b.event, BOUNDS.event, "event");
  if (event !== END_EVENT) throw malformed("event", `is ${JSON.stringify(event)}, want ${JSON.stringify(END_EVENT)}`);
  const { top, rowStart } = header(b);
  const events = arr(b.events, "events").map((row, i) => {
    const { ev, time, ctx } = rowStart(row, i, 14);
    const w = (j, name) => `events[${i}][${j}] (${name})`;
    const duration = int64(row[6], w(6, "duration_ns"));
    const reason = uintMax(row[13], 255, w(13, "reason"));
    const out = {
      event: END_EVENT,
      ...ev,
      begin_ns: BigInt.asIntN(64, time - duration),
      end_ns: time,
      duration_ns: duration,
      src_bytes: uint64(row[7], w(7, "src_bytes")),
      dst_bytes: uint64(row[8], w(8, "dst_bytes")),
      src_segs: uint64(row[9], w(9, "src_segs")),
      dst_segs: uint64(row[10], w(10, "dst_segs")),
      retrans: uint64(row[11], w(11, "retrans")),
      srtt_us: uintMax(row[12], 0xffffffff, w(12, "srtt_us")),
      reason: END_REASONS[reason] ?? "unknown",
      host: top.host,
    };
    if (ctx) Object.assign(out, ctx);
    return out;
  });
  return { ...top, event, events };
}
