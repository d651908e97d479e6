// Usage: node decode.mjs <nats-url> <stream>
//
// Reads every message of a flowbus stream through JetStream with the official NATS JavaScript client
// (an ordered consumer), decodes each batch with flowbus.mjs, and prints one JSON document:
// {"batches":[{subject, stream_seq, headers, batch or end_batch, default_decode}]}: a message on an end
// subject (<prefix>.<host>.<direction>.end) is decoded with decodeEndBatch, any other with decodeBatch. Every 64-bit integer is printed
// as an exact decimal string. default_decode records what a default msgpack decode yields, so the Go
// test can check the pitfall FORMAT.md describes.
import { decode } from "@msgpack/msgpack";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import { decodeBatch, decodeEndBatch } from "./flowbus.mjs";

const HEADERS = ["Nats-Msg-Id", "Content-Type", "Flowbus-Schema"];

// defaultDecode: each event's t0 + dt_ns with decode()'s defaults (numbers only), and what adding them
// does when useBigInt64 is on.
function defaultDecode(data) {
  const plain = decode(data);
  const big = decode(data, { useBigInt64: true });
  const out = {
    t0: String(plain.t0),
    timestamps: plain.events.map((row) => String(plain.t0 + row[4])),
  };
  if (big.events.length > 0) {
    const dt = big.events[0][4];
    out.bigint_mix = { t0_type: typeof big.t0, dt_type: typeof dt };
    try {
      out.bigint_mix.sum = String(big.t0 + dt);
    } catch (e) {
      out.bigint_mix.error = `${e.name}: ${e.message}`;
    }
  }
  return out;
}

async function main(argv) {
  if (argv.length !== 2) {
    throw new Error("usage: node decode.mjs <nats-url> <stream>, e.g. node decode.mjs nats://127.0.0.1:4222 FLOWS");
  }
  const [url, stream] = argv;
  let nc;
  try {
    nc = await connect({ servers: url, timeout: 10000 });
  } catch (e) {
    throw new Error(`cannot connect to NATS at ${url}: ${e.message}`);
  }
  try {
    const jsm = await jetstreamManager(nc);
    let info;
    try {
      info = await jsm.streams.info(stream);
    } catch (e) {
      throw new Error(`stream ${stream} on ${url}: ${e.message}`);
    }
    const want = info.state.messages;
    const consumer = await jetstream(nc).consumers.get(stream); // no name: an ordered consumer
    const batches = [];
    while (batches.length < want) {
      const m = await consumer.next({ expires: 10000 });
      if (m === null) {
        throw new Error(`stream ${stream} has ${want} messages but only ${batches.length} arrived within 10s`);
      }
      const headers = {};
      for (const h of HEADERS) headers[h] = m.headers?.get(h) ?? "";
      const entry = { subject: m.subject, stream_seq: m.seq, headers };
      if (m.subject.endsWith(".end")) entry.end_batch = decodeEndBatch(m.data);
      else entry.batch = decodeBatch(m.data);
      entry.default_decode = defaultDecode(m.data);
      batches.push(entry);
    }
    process.stdout.write(JSON.stringify({ batches }, (_, v) => (typeof v === "bigint" ? v.toString() : v)) + "\n");
  } finally {
    await nc.close();
  }
}

main(process.argv.slice(2)).catch((e) => {
  process.stderr.write(`decode.mjs: ${e.message}\n`);
  process.exit(1);
});
