#!/usr/bin/env node
// The benchmark's load generator: closed-loop gRPC load on lstmd's contract (and TorchServe's).
//
//   node bench/loadgen/loadgen.js --target HOST:PORT [--mode stream|many|torchserve] [options] --json
//
// What it measures: tokens/s and per-message latency (p50/p90/p99/max) over --duration seconds,
// after --warmup seconds of the same load, errors by status code, and its own CPU (user + system
// over the measured wall time, in cores), so a figure it could not drive harder is visible as such.
//   stream      N concurrent bidirectional Stream calls, each an ephemeral session; each sends one
//               StreamRequest of --prompt-tokens random token ids, waits for its Prediction, sends
//               the next (closed loop).
//   many        M sessions per stream (CreateSession; deleted at the end) and S FeedMany calls; each
//               sends a FeedManyRequest of M feeds (one per session), waits for the response, sends
//               the next. Tokens count the items answered with a prediction; item errors count by code.
//   torchserve  N StreamPredictions2 calls to TorchServe, each its own sequence id, one token id per
//               message (bench/torchserve: the same closed loop as stream mode).
// Token ids are drawn in [2, vocab) from a seeded PRNG, one per stream. Candidates are tokens, top 1:
// the load is the server's per-message path and the model step, not the word search. Each stream's
// messages are drawn and encoded before the run (64, sent in turn), and replies are not turned into
// objects (Stream's are only counted; FeedMany's results are counted on the wire, a response with an
// error decoded in full): what is left per message is grpc-js's own work, so the server is the limit.
//
// Why Node: `lstmd bench` (Python grpc.aio) saturated a core as a client well before bare Python
// gRPC servers saturated theirs, so the "transport ceiling" it measured was its own. @grpc/grpc-js
// drives the same echo server 2.5 to 3.5x harder at 64 and 256 streams, on about 0.4 core against
// 0.75. The contract is read at run time from proto/lstmd/v1/lstmd.proto, the one source of truth
// (TorchServe's from --proto-dir).
'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.join(__dirname, '..', '..', 'proto');
const CANDIDATE_KIND_TOKEN = 2;
const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

const { values: opt } = parseArgs({
  options: {
    target: { type: 'string', default: '127.0.0.1:50051' },
    mode: { type: 'string', default: 'stream' },
    streams: { type: 'string', default: '1' },
    'sessions-per-message': { type: 'string', default: '1' },
    'prompt-tokens': { type: 'string', default: '1' },
    duration: { type: 'string', default: '3' },
    warmup: { type: 'string', default: '1' },
    seed: { type: 'string', default: '0' },
    model: { type: 'string', default: '' },
    vocab: { type: 'string', default: '' }, // torchserve: it has no ListModels
    'proto-dir': { type: 'string', default: '' }, // torchserve: inference.proto and google/rpc/status.proto
    'model-name': { type: 'string', default: 'lstm' }, // torchserve
    json: { type: 'boolean', default: false },
    help: { type: 'boolean', short: 'h', default: false },
  },
});
if (opt.help) {
  console.log('node loadgen.js --target HOST:PORT [--mode stream|many|torchserve] [--streams N] ' +
    '[--sessions-per-message M] [--prompt-tokens P] [--duration S] [--warmup S] [--seed N] [--model NAME] ' +
    '[--vocab V --proto-dir DIR --model-name NAME (torchserve)] [--json]');
  process.exit(0);
}
const num = (name, min, whole = true) => {
  const v = Number(opt[name]);
  if (!(whole ? Number.isInteger(v) : Number.isFinite(v)) || v < min) fail(`--${name} must be >= ${min}: ${opt[name]}`);
  return v;
};
const streams = num('streams', 1);
const perMessage = opt.mode === 'many' ? num('sessions-per-message', 1) : 1;
const promptTokens = num('prompt-tokens', 1);
const duration = num('duration', 0.01, false);
const warmup = num('warmup', 0, false);
if (!['stream', 'many', 'torchserve'].includes(opt.mode)) fail(`--mode is stream, many or torchserve, not ${opt.mode}`);

function fail(why) {
  console.error(`loadgen: ${why}`);
  process.exit(2);
}

// A client of `service` from the .proto file, and the loaded definitions (its messages' descriptors).
function load(file, includeDirs, service) {
  const options = { keepCase: true, longs: Number, enums: Number, defaults: false, includeDirs };
  const loaded = protoLoader.loadSync(file, options);
  let Service = grpc.loadPackageDefinition(loaded);
  for (const part of service.split('.')) Service = Service[part];
  // No retry layer and no channelz bookkeeping: both cost CPU per message and a benchmark needs neither.
  const channel = { 'grpc.enable_retries': 0, 'grpc.enable_channelz': 0 };
  return [new Service(opt.target, grpc.credentials.createInsecure(), channel), loaded];
}

// POOL messages from make(), encoded once before the run, for a stream to send in turn.
const POOL = 64;
const encoded = (client, method, make) =>
  Array.from({ length: POOL }, () => client.constructor.service[method].requestSerialize(make()));
// Opens a bidirectional call of `method` that writes encoded messages and reads replies with `decode`.
const bidi = (client, method, decode) => () =>
  client.makeBidiStreamRequest(client.constructor.service[method].path, (buffer) => buffer, decode);

// mulberry32: a small seeded PRNG, so a run's token ids are reproducible.
function prng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), a | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
function tokenIds(rand, vocab, n) {
  const ids = new Array(n);
  for (let i = 0; i < n; i++) ids[i] = 2 + Math.floor(rand() * (vocab - 2));
  return ids;
}

// The run's clock and tallies: warming up, then measuring for --duration, then stopping.
const run = { phase: 'warmup', latencies: [], messages: 0, tokens: 0, errors: {}, t0: 0, t1: 0, cpu: null };
const measuring = () => run.phase === 'measure';
const running = () => run.phase !== 'stop';
function countError(code) {
  if (run.phase === 'stop') return; // cancelled at the end
  const name = CODE_NAMES[code] ?? `CODE_${code}`;
  run.errors[name] = (run.errors[name] ?? 0) + 1;
}
function answered(sentAt, tokens) {
  if (!measuring()) return;
  run.latencies.push(performance.now() - sentAt);
  run.messages += 1;
  run.tokens += tokens;
}

// One closed loop on bidirectional calls from open(): writes the messages in turn, each when the
// previous one is answered; reply(decoded) says how many tokens an answer holds. A call that ends
// with an error is counted and opened again (but not one the server does not implement); the
// promise resolves when the run has stopped and the call has ended.
const calls = new Set(); // open calls, cancelled if they are still open a while after the run stops
function closedLoop(open, messages, reply) {
  let sent = 0;
  return new Promise((resolve) => {
    const start = () => {
      const call = open();
      calls.add(call);
      let sentAt = 0;
      const next = () => {
        sentAt = performance.now();
        call.write(messages[sent++ % messages.length]);
      };
      call.on('data', (message) => {
        answered(sentAt, reply(message));
        if (running()) next();
        else call.end();
      });
      call.on('error', () => {}); // reported by 'status'
      call.on('status', ({ code }) => {
        calls.delete(call);
        if (code !== grpc.status.OK) countError(code);
        if (running() && code !== grpc.status.OK && code !== grpc.status.UNIMPLEMENTED) setImmediate(start);
        else resolve();
      });
      next();
    };
    start();
  });
}

const unary = (client, method, request) => new Promise((resolve, reject) => {
  client[method](request, { deadline: Date.now() + 10000 }, (e, reply) => {
    if (e) e.message = `${method} on ${opt.target}: ${e.message}`;
    return e ? reject(e) : resolve(reply);
  });
});

// FeedManyResponse.results counted on the wire rather than built into objects: a result holding a
// prediction starts with the prediction's tag. A response with any other result is decoded in full,
// its errors counted by code. The tags come from the loaded contract's field numbers.
function resultCounter(loaded, client) {
  const number = (type, field) => loaded[`lstmd.v1.${type}`].type.field.find((f) => f.name === field).number;
  const resultsTag = (number('FeedManyResponse', 'results') << 3) | 2; // 2: length-delimited
  const predictionTag = (number('FeedResult', 'prediction') << 3) | 2;
  const full = (buffer) => {
    let ok = 0;
    for (const r of client.constructor.service.FeedMany.responseDeserialize(buffer).results ?? []) {
      if (r.prediction) ok += 1;
      else countError(r.error?.code ?? grpc.status.UNKNOWN);
    }
    return ok;
  };
  return (buffer) => {
    let ok = 0;
    for (let at = 0; at < buffer.length; ok += 1) {
      if (buffer[at++] !== resultsTag) return full(buffer);
      let length = 0;
      for (let shift = 0, byte = 0x80; byte & 0x80; shift += 7) { // a varint (undefined past the end: 0)
        byte = buffer[at++];
        length += (byte & 0x7f) * 2 ** shift;
      }
      if (buffer[at] !== predictionTag) return full(buffer);
      at += length;
    }
    return ok;
  };
}

async function lstmdLoops(seed) {
  const [client, loaded] = load('lstmd/v1/lstmd.proto', [PROTO_ROOT], 'lstmd.v1.Lstmd');
  const { models } = await unary(client, 'ListModels', {});
  const model = models.find((m) => (opt.model ? m.name === opt.model : m.is_default));
  if (!model) fail(`no model ${opt.model || '(default)'} on ${opt.target}`);
  const feed = (rand) => ({ tokens: { ids: tokenIds(rand, model.vocab_size, promptTokens) }, top_k: 1,
    candidates: CANDIDATE_KIND_TOKEN });
  if (opt.mode === 'stream') {
    const loops = Array.from({ length: streams }, (_, i) => {
      const rand = prng(seed + i);
      // Every message names the model: the contract lets later messages repeat the first one's.
      const messages = encoded(client, 'Stream', () => ({ model: opt.model, ...feed(rand) }));
      return () => closedLoop(bidi(client, 'Stream', (buffer) => buffer), messages, () => promptTokens);
    });
    return { loops, cleanup: async () => client.close() };
  }
  const sessions = await Promise.all(Array.from({ length: streams * perMessage },
    () => unary(client, 'CreateSession', { model: opt.model, top_k: 1 }).then((s) => s.session_id)));
  const count = resultCounter(loaded, client);
  const loops = Array.from({ length: streams }, (_, i) => {
    const rand = prng(seed + i);
    const mine = sessions.slice(i * perMessage, (i + 1) * perMessage);
    const items = () => mine.map((id) => ({ session_id: id, ...feed(rand) }));
    const messages = encoded(client, 'FeedMany', () => ({ items: items() }));
    return () => closedLoop(bidi(client, 'FeedMany', count), messages, (answered) => answered * promptTokens);
  });
  const cleanup = async () => {
    await Promise.allSettled(sessions.map((id) => unary(client, 'DeleteSession', { session_id: id })));
    client.close();
  };
  return { loops, cleanup };
}

function torchserveLoops(seed) {
  if (!opt['proto-dir'] || !opt.vocab) fail('--mode torchserve needs --proto-dir and --vocab');
  const service = 'org.pytorch.serve.grpc.inference.InferenceAPIsService';
  const [client] = load('inference.proto', [opt['proto-dir']], service);
  const vocab = num('vocab', 3);
  const decode = client.constructor.service.StreamPredictions2.responseDeserialize;
  const loops = Array.from({ length: streams }, (_, i) => {
    const rand = prng(seed + i);
    const sequence = `seq-${seed}-${i}-${process.pid}-${Date.now()}`;
    const messages = encoded(client, 'StreamPredictions2', () => ({ model_name: opt['model-name'],
      sequence_id: sequence, input: { data: Buffer.from(String(tokenIds(rand, vocab, 1)[0])) } })); // a decimal id
    const reply = (r) => {
      if (r.status && r.status.code !== 0) {
        countError(r.status.code);
        return 0;
      }
      return 1;
    };
    return () => closedLoop(bidi(client, 'StreamPredictions2', decode), messages, reply);
  });
  return { loops, cleanup: async () => client.close() };
}

// numpy's default percentile: linear interpolation between the two nearest ranks.
function percentile(sorted, q) {
  if (sorted.length === 0) return 0;
  const at = (q / 100) * (sorted.length - 1);
  const lo = Math.floor(at);
  const hi = Math.min(lo + 1, sorted.length - 1);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (at - lo);
}

async function main() {
  const seed = num('seed', 0) * 100000;
  const { loops, cleanup } = opt.mode === 'torchserve' ? torchserveLoops(seed) : await lstmdLoops(seed);
  const began = () => {
    run.phase = 'measure';
    run.t0 = performance.now();
    run.cpu = process.cpuUsage();
    process.stderr.write('loadgen: measuring\n'); // the window's edges, for whoever samples the server's CPU
  };
  const looping = Promise.all(loops.map((loop) => loop()));
  if (warmup > 0) setTimeout(began, warmup * 1000);
  else began();
  const stopped = new Promise((resolve) => setTimeout(() => {
    run.cpu = process.cpuUsage(run.cpu);
    run.t1 = performance.now();
    run.phase = 'stop';
    process.stderr.write('loadgen: stopped\n');
    setTimeout(() => calls.forEach((call) => call.cancel()), 5000).unref();
    resolve();
  }, (warmup + duration) * 1000));
  await Promise.all([looping, stopped]); // the loops may end early (UNIMPLEMENTED): the window stands
  await cleanup();
  const seconds = (run.t1 - run.t0) / 1000;
  const sorted = Float64Array.from(run.latencies).sort();
  const report = {
    mode: opt.mode,
    streams,
    sessions_per_message: perMessage,
    tokens_per_message: perMessage * promptTokens,
    messages: run.messages,
    tokens: run.tokens,
    seconds,
    tokens_per_s: run.tokens / seconds,
    latency_ms: { p50: percentile(sorted, 50), p90: percentile(sorted, 90), p99: percentile(sorted, 99),
      max: sorted.length ? sorted[sorted.length - 1] : 0 },
    errors: run.errors,
    client_cpu_cores: (run.cpu.user + run.cpu.system) / 1e6 / seconds,
  };
  if (opt.json) console.log(JSON.stringify(report));
  else {
    const l = report.latency_ms;
    console.log(`${opt.mode}: ${streams} stream(s) x ${report.tokens_per_message} token(s) per message, ` +
      `${report.messages} messages in ${seconds.toFixed(2)} s\n  ${report.tokens_per_s.toFixed(0)} tokens/s, ` +
      `latency p50 ${l.p50.toFixed(2)} p90 ${l.p90.toFixed(2)} p99 ${l.p99.toFixed(2)} max ${l.max.toFixed(2)} ms, ` +
      `errors ${JSON.stringify(report.errors)}, load generator ${report.client_cpu_cores.toFixed(2)} cores`);
  }
}

main().catch((e) => fail(e.code === undefined ? e.stack : e.message)); // an RPC's error, or a bug
