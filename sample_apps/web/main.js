// An edgekit bundle in the browser: onnxruntime-web (wasm EP) runs the graph, @huggingface/tokenizers
// (npm, vendored by `npm ci`, served from node_modules) reads the bundle's tokenizer.json to encode the
// typed prompt and decode the streamed tokens.
// Generation: prefill the prompt, then one decode step per token with the MLA latent cache (one
// Float32Array [1, past, W] per layer; each step appends the graph's new_latent rows). Sampling as
// edgekit.runtime.Engine: temperature 0 = argmax, else softmax(logits / T) filtered by top-k and top-p,
// drawn with a seeded PRNG (mulberry32: same seed, same tokens in this page; not numpy's stream).
// Stops at max new tokens, the end-of-sequence token, the context limit, or the Stop button.
// URL parameters: bundle (URL prefix of the bundle, default /bundle/); report (URL to POST each
// finished generation's JSON to: the tests use it); case (reference.json case index: fills the prompt
// with that case, greedy, its max_new_tokens, and starts: the reference test).
import { Tokenizer } from "/hf/tokenizers.min.mjs";

const q = new URLSearchParams(location.search);
const base = q.get("bundle") || "/bundle/";
const $ = (id) => document.getElementById(id);
const status = (s) => ($("status").textContent = s);

function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function pick(logits, V, s, rand) {
  const d = logits.data, off = d.length - V;     // the last position's row
  if (s.temperature === 0) {
    let best = 0;
    for (let v = 1; v < V; v++) if (d[off + v] > d[off + best]) best = v;
    return best;
  }
  let order = Array.from({ length: V }, (_, v) => v).sort((a, b) => d[off + b] - d[off + a]);
  if (s.topK > 0) order = order.slice(0, s.topK);
  const z = order.map((v) => d[off + v] / s.temperature), m = z[0];
  let p = z.map((x) => Math.exp(x - m));
  const sum = p.reduce((a, b) => a + b, 0);
  p = p.map((x) => x / sum);
  if (s.topP < 1) {
    let acc = 0, keep = p.length;
    for (let i = 0; i < p.length; i++) { acc += p[i]; if (acc >= s.topP) { keep = i + 1; break; } }
    order = order.slice(0, keep); p = p.slice(0, keep);
    const s2 = p.reduce((a, b) => a + b, 0); p = p.map((x) => x / s2);
  }
  let r = rand();
  for (let i = 0; i < p.length; i++) { r -= p[i]; if (r <= 0) return order[i]; }
  return order[order.length - 1];
}

async function load() {
  const get = (f) => fetch(base + f).then((r) => { if (!r.ok) throw new Error(`${f}: HTTP ${r.status}`); return r; });
  const spec = await (await get("export.json")).json();
  const tokenizer = new Tokenizer(await (await get("tokenizer.json")).json(), {});
  ort.env.wasm.numThreads = 1;   // threads need cross-origin isolation (COOP/COEP headers)
  ort.env.wasm.wasmPaths = "/ort/";
  status("loading the graph…");
  const bytes = new Uint8Array(await (await get(spec.graph)).arrayBuffer());
  const session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"] });
  return { spec, tokenizer, session, get };
}

function settings() {
  return { n: Math.max(1, Number($("n").value) | 0), temperature: Math.max(0, Number($("temperature").value)),
           topK: Math.max(0, Number($("topk").value) | 0), topP: Math.min(1, Math.max(0.01, Number($("topp").value))),
           seed: Number($("seed").value) | 0 };
}

async function generate(m, prompt, s, stopped) {
  const { spec, tokenizer, session } = m;
  const W = spec.cache.width, L = spec.num_layers, V = spec.vocab_size;
  const hasKeep = session.inputNames.includes("logits_keep");   // a graph input only when not folded away
  const ids = tokenizer.encode(prompt, { add_special_tokens: false }).ids;   // as edgekit.runtime.Engine.encode
  if (!ids.length) throw new Error("empty prompt: type some text first");
  const room = spec.max_position_embeddings - ids.length + 1;
  if (room < 1) throw new Error(`the prompt is ${ids.length} tokens; the model holds ${spec.max_position_embeddings}`);
  const n = Math.min(s.n, room), rand = mulberry32(s.seed);
  let cache = Array.from({ length: L }, () => new Float32Array(0)), past = 0;
  const step = async (x) => {
    const feeds = { input_ids: new ort.Tensor("int64", BigInt64Array.from(x.map(BigInt)), [1, x.length]) };
    for (let i = 0; i < L; i++) feeds[`past_latent.${i}`] = new ort.Tensor("float32", cache[i], [1, past, W]);
    if (hasKeep) feeds.logits_keep = new ort.Tensor("int64", BigInt64Array.from([1n]), []);
    const out = await session.run(feeds);
    for (let i = 0; i < L; i++) {
      const add = out[`new_latent.${i}`].data, merged = new Float32Array(cache[i].length + add.length);
      merged.set(cache[i]); merged.set(add, cache[i].length); cache[i] = merged;
    }
    past += x.length;
    return pick(out.logits, V, s, rand);
  };
  const show = (gen) => {
    const out = $("out");
    out.textContent = prompt;
    const span = document.createElement("span");
    span.className = "gen";
    span.textContent = tokenizer.decode(gen, { skip_special_tokens: true });
    out.appendChild(span);
  };
  const t0 = performance.now();
  const gen = [];
  let tok = await step(ids), stop = "length";
  const prefillMs = performance.now() - t0;
  for (;;) {
    if (tok === spec.eos_token_id) { stop = "eos"; break; }
    gen.push(tok);
    show(gen);
    await new Promise((r) => setTimeout(r, 0));                  // let the page paint and the Stop click land
    if (stopped()) { stop = "stopped"; break; }
    if (gen.length >= n) break;
    tok = await step([tok]);
  }
  const ms = performance.now() - t0;
  return { prompt, prompt_ids: ids, greedy_ids: gen, ids: gen, text: tokenizer.decode(gen, { skip_special_tokens: true }),
           stop, settings: s, prefill_ms: prefillMs, decode_ms_per_token: (ms - prefillMs) / Math.max(1, gen.length - 1),
           ort_version: ort.env.versions?.web };
}

async function main() {
  const m = await load();
  let stopFlag = false, busy = false;
  const report = (r) => {
    $("result").textContent = JSON.stringify(r);
    if (q.get("report")) fetch(q.get("report"), { method: "POST", body: JSON.stringify(r) });
  };
  const run = async () => {
    if (busy) return;
    busy = true; stopFlag = false;
    $("go").disabled = true; $("stop").disabled = false;
    status("generating…");
    try {
      const r = await generate(m, $("prompt").value, settings(), () => stopFlag);
      $("stats").textContent = `${r.prompt_ids.length} prompt tokens, ${r.ids.length} new (${r.stop}); prefill ` +
        `${r.prefill_ms.toFixed(0)} ms, ${r.decode_ms_per_token.toFixed(1)} ms/token; onnxruntime-web ${r.ort_version}`;
      status("done");
      report({ ok: true, ...r });
    } catch (e) {
      status("failed: " + e.message);
      report({ ok: false, error: String(e && e.stack || e) });
    } finally {
      busy = false;
      $("go").disabled = false; $("stop").disabled = true;
    }
  };
  $("go").onclick = run;
  $("stop").onclick = () => { stopFlag = true; };
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run(); });
  $("prompt").disabled = false; $("go").disabled = false;
  status("ready: type a prompt and press Generate (Ctrl+Enter)");
  if (q.has("case")) {
    const ref = await (await m.get("reference.json")).json();
    const c = ref.cases[Number(q.get("case"))];
    $("prompt").value = c.prompt; $("n").value = ref.max_new_tokens; $("temperature").value = 0;
    await run();
  }
}

main().catch((e) => { status("failed: " + e.message); $("result").textContent = JSON.stringify({ ok: false, error: String(e.stack || e) });
  if (q.get("report")) fetch(q.get("report"), { method: "POST", body: JSON.stringify({ ok: false, error: String(e.stack || e) }) }); });
