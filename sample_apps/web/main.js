// Greedy generation in the browser from an edgekit `web` bundle, with onnxruntime-web (wasm EP).
// URL parameters: bundle (URL prefix of the bundle files, default /bundle/), case (reference.json
// case index; its prompt_ids are used, so no JS tokenizer encoder is needed), n (new tokens),
// report (URL to POST the result JSON to; the test uses it).
// Cache: per layer a Float32Array [1, past, W]; each step appends the graph's new_latent rows.
// Text: ids -> byte-level BPE pieces (tokenizer.json vocab) -> bytes -> UTF-8.

const q = new URLSearchParams(location.search);
const base = q.get("bundle") || "/bundle/";
const caseIndex = Number(q.get("case") || 0);
const status = (s) => (document.getElementById("status").textContent = s);

function byteDecoder() {
  // GPT-2 bytes_to_unicode, inverted: printable chars map to themselves, the rest to 256 + n
  const bs = [];
  for (let i = 33; i <= 126; i++) bs.push(i);
  for (let i = 161; i <= 172; i++) bs.push(i);
  for (let i = 174; i <= 255; i++) bs.push(i);
  const cs = bs.slice();
  let n = 0;
  for (let b = 0; b < 256; b++) if (!bs.includes(b)) { bs.push(b); cs.push(256 + n++); }
  const m = new Map();
  bs.forEach((b, i) => m.set(String.fromCharCode(cs[i]), b));
  return m;
}

function makeDecoder(tokenizer) {
  const inv = new Map(Object.entries(tokenizer.model.vocab).map(([k, v]) => [v, k]));
  const special = new Set((tokenizer.added_tokens || []).filter((t) => t.special).map((t) => t.id));
  const bd = byteDecoder();
  return (ids) => {
    const bytes = [];
    for (const id of ids) {
      if (special.has(id)) continue;
      for (const ch of inv.get(id) || "") bytes.push(bd.get(ch));
    }
    return new TextDecoder().decode(new Uint8Array(bytes));
  };
}

function argmaxLast(logits) {
  const [, T, V] = logits.dims;
  const d = logits.data, off = (T - 1) * V;
  let best = 0;
  for (let v = 1; v < V; v++) if (d[off + v] > d[off + best]) best = v;
  return best;
}

async function run() {
  const get = (f) => fetch(base + f).then((r) => { if (!r.ok) throw new Error(`${f}: HTTP ${r.status}`); return r; });
  const spec = await (await get("export.json")).json();
  const ref = await (await get("reference.json")).json();
  const decode = makeDecoder(await (await get("tokenizer.json")).json());
  const c = ref.cases[caseIndex];
  const n = Number(q.get("n") || ref.max_new_tokens);
  ort.env.wasm.numThreads = 1;   // threads need cross-origin isolation (COOP/COEP headers)
  ort.env.wasm.wasmPaths = "/ort/";
  status("loading the graph…");
  const bytes = new Uint8Array(await (await get(spec.graph)).arrayBuffer());
  const session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"] });
  const W = spec.cache.width, L = spec.num_layers;
  const hasKeep = session.inputNames.includes("logits_keep");   // a graph input only when not folded away
  let cache = Array.from({ length: L }, () => new Float32Array(0));
  let past = 0;
  const step = async (ids) => {
    const feeds = { input_ids: new ort.Tensor("int64", BigInt64Array.from(ids.map(BigInt)), [1, ids.length]) };
    for (let i = 0; i < L; i++) feeds[`past_latent.${i}`] = new ort.Tensor("float32", cache[i], [1, past, W]);
    if (hasKeep) feeds.logits_keep = new ort.Tensor("int64", BigInt64Array.from([1n]), []);
    const out = await session.run(feeds);
    for (let i = 0; i < L; i++) {
      const add = out[`new_latent.${i}`].data, merged = new Float32Array(cache[i].length + add.length);
      merged.set(cache[i]); merged.set(add, cache[i].length); cache[i] = merged;
    }
    past += ids.length;
    return argmaxLast(out.logits);
  };
  const t0 = performance.now();
  const gen = [await step(c.prompt_ids)];
  const prefillMs = performance.now() - t0;
  status("decoding…");
  for (let k = 1; k < n; k++) {
    gen.push(await step([gen[gen.length - 1]]));
    document.getElementById("text").textContent = c.prompt + decode(gen);
  }
  const ms = performance.now() - t0;
  const result = { greedy_ids: gen, text: decode(gen), prompt: c.prompt, prefill_ms: prefillMs,
                   decode_ms_per_token: (ms - prefillMs) / Math.max(1, n - 1), ort_version: ort.env.versions?.web };
  document.getElementById("text").textContent = c.prompt + result.text;
  return result;
}

run().then((r) => ({ ok: true, ...r }), (e) => ({ ok: false, error: String(e && e.stack || e) })).then((r) => {
  status(r.ok ? "done" : "failed: " + r.error);
  document.getElementById("result").textContent = JSON.stringify(r);
  if (q.get("report")) fetch(q.get("report"), { method: "POST", body: JSON.stringify(r) });
});
