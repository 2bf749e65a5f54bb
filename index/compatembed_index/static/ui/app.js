// The web page of the compatembed index service (served at /ui/ by compatembed_index.ui).
//
// Every piece of stored data (collection names, version ids, metadata, report text) reaches the page as
// text: the DOM is built with createElement and textContent, attributes with setAttribute, and nothing
// is ever parsed as HTML. The page runs under a Content-Security-Policy that allows only this script.
"use strict";

const state = {
  info: { write_key: false, images: false, report: false, max_k: 1000 },
  versions: [],        // [{version_id, dim, normalized, edges}]
  routes: { query: {}, forward: {} },
  collections: [],     // names
  aliases: {},         // alias -> collection
  stats: {},           // name -> stats
  selected: null,      // collection name
  query: null,         // {label, id, collection, version, metadata, vectors: {version: base64}, dim}
  columns: [],         // [{collection, version}]
};

// -- small DOM helpers ------------------------------------------------------------------------------
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = String(v);
    else if (k.startsWith("data-") || ["title", "alt", "type", "value", "colspan", "href", "rel", "target"].includes(k)) {
      node.setAttribute(k, String(v));
    } else throw new Error("el: attribute " + k + " is not allowed");
  }
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

function setStatus(text, isError) {
  const s = $("status");
  s.textContent = text || "";
  s.className = isError ? "error" : "";
}

function versionClass(v) {
  const i = state.versions.findIndex((x) => x.version_id === v);
  return "v" + ((i < 0 ? 0 : i) % 8);
}

function badge(v) {
  return el("span", { class: "badge " + versionClass(v), "data-version": v, text: v });
}

// -- the API --------------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, name, message) {
    super(`${status} ${name}: ${message}`);
    this.status = status;
    this.errorName = name;
  }
}

async function api(method, path, body) {
  const headers = {};
  const key = $("api-key").value;
  if (key) headers["X-API-Key"] = key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  let payload = null;
  try { payload = JSON.parse(text); } catch (e) { payload = null; }
  if (!r.ok) {
    const name = payload && typeof payload.error === "string" ? payload.error : "HTTPError";
    const message = payload && typeof payload.message === "string" ? payload.message : text.slice(0, 200);
    throw new ApiError(r.status, name, message);
  }
  return payload;
}

const seg = (name) => encodeURIComponent(name);

// -- loading ------------------------------------------------------------------------------------------
async function loadAll() {
  setStatus("loading…");
  state.info = await api("GET", "/ui/api/info");
  state.versions = await api("GET", "/versions");
  state.routes = await api("GET", "/ui/api/routes");
  const listed = await api("GET", "/collections");
  state.collections = listed.collections;
  state.aliases = listed.aliases;
  const stats = await Promise.all(state.collections.map((n) => api("GET", "/collections/" + seg(n))));
  state.stats = Object.fromEntries(state.collections.map((n, i) => [n, stats[i]]));
  if (!state.collections.includes(state.selected)) {
    const aliased = Object.values(state.aliases).find((c) => state.collections.includes(c));
    state.selected = aliased || state.collections[0] || null;
  }
  renderCollectionSelect();
  renderCollections();
  renderGraph();
  renderRoutes();
  renderFileVersions();
  state.columns = defaultColumns();
  renderColumnEditor();
  $("writes-hint").textContent = state.info.write_key
    ? "This service needs its API key for writes: enter it above."
    : "This service accepts writes without a key.";
  setStatus(`${state.collections.length} collection(s), ${state.versions.length} version(s)`);
  if (state.info.report) loadReport().catch((e) => setStatus("report: " + e.message, true));
}

function segmentCounts(name) {
  const st = state.stats[name];
  if (!st) return {};
  const out = {};
  for (const [v, s] of Object.entries(st.segments)) if (s.ntotal > 0) out[v] = s.ntotal;
  return out;
}

// -- collections and backfill ---------------------------------------------------------------------------
function renderCollectionSelect() {
  const sel = clear($("collection"));
  for (const n of state.collections) sel.append(el("option", { value: n, text: n }));
  if (state.selected) sel.value = state.selected;
}

function renderCollections() {
  const table = clear($("collections"));
  table.append(el("tr", {}, el("th", { text: "collection" }), el("th", { text: "aliases" }), el("th", { text: "items" }),
    el("th", { text: "items per version" }), el("th", { text: "backfill" }), el("th", { text: "materialised copies" })));
  for (const name of state.collections) {
    const st = state.stats[name];
    const counts = segmentCounts(name);
    const aliases = Object.entries(state.aliases).filter(([, c]) => c === name).map(([a]) => a).join(", ");
    const bar = el("div", { class: "bar", title: "share of the items held by each version" });
    const parts = el("div");
    for (const [v, n] of Object.entries(counts)) {
      const span = el("span", { class: versionClass(v), title: `${v}: ${n}` });
      span.style.width = (100 * n / Math.max(1, st.items)) + "%";
      bar.append(span);
      parts.append(el("div", {}, badge(v), " ", String(n), ` (${(100 * n / Math.max(1, st.items)).toFixed(1)}%)`));
    }
    const copies = st.materialised.map((c) => `${c.source} → ${c.target} (${c.ntotal})`).join(", ") || "none";
    const row = el("tr", { class: "clickable" + (name === state.selected ? " selected" : ""), "data-collection": name },
      el("td", {}, el("strong", { text: name })), el("td", { text: aliases || "—" }), el("td", { text: String(st.items) }),
      el("td", {}, parts), el("td", {}, bar), el("td", { text: copies }));
    row.addEventListener("click", () => selectCollection(name));
    table.append(row);
  }
}

function selectCollection(name) {
  state.selected = name;
  $("collection").value = name;
  renderCollections();
  renderGraph();
  renderRoutes();
  state.columns = defaultColumns();
  renderColumnEditor();
}

// -- the version graph ----------------------------------------------------------------------------------
function versionOrder() {
  // oldest first: a version's manifest declares its edges to older versions (a query edge's target, a
  // forward edge's source), so its depth is the longest chain of declared edges below it. Routes cannot
  // tell age: an identity edge routes queries both ways.
  const older = Object.fromEntries(state.versions.map((v) => [v.version_id,
    v.edges.map((e) => (e.kind === "forward" ? e.source : e.target))]));
  const depth = {};
  const walk = (v, seen) => {
    if (v in depth) return depth[v];
    if (seen.has(v)) return 0;  // a cycle of declarations: stop
    seen.add(v);
    depth[v] = Math.max(0, ...older[v].filter((o) => o in older).map((o) => 1 + walk(o, seen)));
    return depth[v];
  };
  const ids = Object.keys(older);
  ids.forEach((v) => walk(v, new Set()));
  return ids.sort((a, b) => depth[a] - depth[b] || a.localeCompare(b));
}

function renderGraph() {
  const box = clear($("graph"));
  const order = versionOrder();
  if (!order.length) { box.append(el("p", { class: "hint", text: "No version is registered." })); return; }
  const counts = state.selected ? segmentCounts(state.selected) : {};
  const W = 150, H = 54, GAP = 90, TOP = 80;
  const width = order.length * W + (order.length - 1) * GAP + 40;
  const height = TOP + H + 90;
  const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "version graph" });
  const defs = svg("defs");
  for (const [id, color] of [["arrow", "#5c6675"], ["arrow-fwd", "#2e9e5b"]]) {
    const m = svg("marker", { id, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" });
    m.append(svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: color }));
    defs.append(m);
  }
  root.append(defs);
  const x = (v) => 20 + order.indexOf(v) * (W + GAP) + W / 2;
  for (const v of state.versions) {
    for (const e of v.edges) {
      const forward = e.kind === "forward";
      const from = forward ? e.source : v.version_id;
      const to = forward ? v.version_id : e.target;
      if (!order.includes(from) || !order.includes(to)) continue;
      const x1 = x(from), x2 = x(to);
      const up = !forward;
      const y = up ? TOP : TOP + H;
      const bend = (up ? -1 : 1) * (30 + 12 * Math.abs(order.indexOf(from) - order.indexOf(to)));
      const path = `M ${x1} ${y} C ${x1} ${y + bend}, ${x2} ${y + bend}, ${x2} ${y}`;
      root.append(svg("path", { d: path, class: "edge" + (forward ? " forward" : ""), "marker-end": forward ? "url(#arrow-fwd)" : "url(#arrow)" }));
      const label = e.kind + (e.kind === "prefix" && e.dim ? "" : "");
      root.append(svg("text", { x: (x1 + x2) / 2, y: y + bend * 0.75 + (up ? -2 : 10), "text-anchor": "middle", class: "edge-label" }, label));
    }
  }
  for (const vid of order) {
    const v = state.versions.find((q) => q.version_id === vid);
    const g = svg("g", { "data-version": vid });
    g.append(svg("rect", { x: x(vid) - W / 2, y: TOP, width: W, height: H, rx: 6, class: "fill-" + versionClass(vid) }));
    g.append(svg("text", { x: x(vid), y: TOP + 20, "text-anchor": "middle", class: "node-label" }, vid));
    const n = counts[vid] || 0;
    g.append(svg("text", { x: x(vid), y: TOP + 38, "text-anchor": "middle", class: "node-sub" },
      `${v.dim}-d${v.normalized ? ", cosine" : ", L2"} · ${n} item${n === 1 ? "" : "s"}`));
    root.append(g);
  }
  box.append(root);
}

function howReached(q, s, name) {
  if (q === s) return { text: "direct", ok: true };
  const st = state.stats[name];
  if (st && st.materialised.some((c) => c.source === s && c.target === q)) {
    return { text: `forward copy ${s} → ${q}`, ok: true };
  }
  const path = (state.routes.query[q] || {})[s];
  if (path) return { text: "query route " + path.join(" › "), ok: true };
  return { text: "no route", ok: false };
}

function renderRoutes() {
  const table = clear($("routes"));
  $("routes-collection").textContent = state.selected || "—";
  if (!state.selected) return;
  const segs = Object.keys(segmentCounts(state.selected));
  if (!segs.length) { table.append(el("tr", {}, el("td", { text: "The collection is empty." }))); return; }
  table.append(el("tr", {}, el("th", { text: "query version ↓ / segment →" }), ...segs.map((s) => el("th", {}, badge(s)))));
  for (const q of versionOrder()) {
    const row = el("tr", { "data-query-version": q }, el("th", {}, badge(q)));
    for (const s of segs) {
      const how = howReached(q, s, state.selected);
      row.append(el("td", { class: how.ok ? "" : "error", text: how.text }));
    }
    table.append(row);
  }
}

// -- search ----------------------------------------------------------------------------------------------
function imageUrl(meta) {
  const v = meta && typeof meta === "object" && !Array.isArray(meta) ? meta.image : undefined;
  if (typeof v !== "string" || !v) return null;
  if (/^https?:\/\//i.test(v)) {
    try {
      const u = new URL(v);
      return u.protocol === "http:" || u.protocol === "https:" ? u.href : null;
    } catch (e) { return null; }
  }
  return state.info.images ? "/ui/image?path=" + encodeURIComponent(v) : null;
}

function placeholder(text) {
  return el("div", { class: "thumb placeholder", text: text || "no image" });
}

function thumbnail(meta) {
  const url = imageUrl(meta);
  if (!url) return placeholder();
  const img = el("img", { class: "thumb", alt: "item image" });
  img.addEventListener("error", () => img.replaceWith(placeholder("image unavailable")));
  img.src = url;
  return img;
}

function caption(meta) {
  if (!meta || typeof meta !== "object" || Array.isArray(meta)) return "";
  for (const k of ["class", "name", "title", "label"]) {
    const v = meta[k];
    if (typeof v === "string" || typeof v === "number") return String(v);
  }
  return "";
}

function metadataText(meta) {
  const s = meta === undefined || meta === null ? "no metadata" : JSON.stringify(meta);
  return s.length > 240 ? s.slice(0, 240) + "…" : s;
}

function card(hit, selfId) {
  const c = el("div", { class: "card" + (hit.id === selfId ? " self" : ""), "data-id": hit.id, "data-version": hit.version,
    title: `item ${hit.id}, stored by ${hit.version}` + (hit.id === selfId ? " (the query itself)" : "") });
  c.append(thumbnail(hit.metadata));
  c.append(el("div", { class: "line" }, badge(hit.version), el("span", { class: "score", text: hit.score.toFixed(4) })));
  c.append(el("div", { class: "line" }, el("span", { class: "item-id", text: "#" + hit.id }),
    el("span", { class: "caption", text: caption(hit.metadata) })));
  c.append(el("pre", { class: "metadata", text: metadataText(hit.metadata) }));
  c.addEventListener("click", () => { $("item-id").value = String(hit.id); searchItem(hit.id).catch(showError); });
  return c;
}

function kValue() {
  const k = parseInt($("k").value, 10);
  if (!Number.isInteger(k) || k < 1) throw new Error("k must be a positive integer");
  return k;
}

async function search(collection, version, b64, dim, k) {
  return api("POST", "/collections/" + seg(collection) + "/search", {
    version, vectors_b64: { shape: [1, dim], data: b64 }, k, allow_partial: $("allow-partial").checked,
  });
}

function routesLine(res, collection) {
  const parts = Object.entries(res.routes).map(([s, how]) => `${s}: ${how}`);
  let text = `${collection}: searched ${parts.join("; ") || "no segment"}`;
  if (res.skipped.length) text += `; skipped (no route): ${res.skipped.join(", ")}`;
  return text;
}

function renderQuery() {
  const box = clear($("query"));
  const q = state.query;
  if (!q) return;
  const c = el("div", { class: "card", "data-query": q.label });
  c.append(q.metadata !== undefined ? thumbnail(q.metadata) : placeholder("uploaded vector"));
  c.append(el("div", { class: "line" }, badge(q.version), el("span", { text: q.dim + "-d" })));
  c.append(el("div", { class: "caption", text: q.label }));
  box.append(c);
  const known = Object.keys(q.vectors);
  const where = q.stored && q.stored !== q.version ? ` (stored as ${q.stored} in ${state.selected}; its ${q.version} vector reaches every segment)` : "";
  box.append(el("div", {}, el("div", { text: `Query: ${q.label}, a vector of ${q.version}${where}.` }),
    el("div", { class: "hint", text: `Vectors of this query by version: ${known.join(", ")}.` }),
    q.metadata !== undefined ? el("pre", { class: "metadata", text: metadataText(q.metadata) }) : null));
}

async function runMainSearch() {
  const q = state.query;
  const k = kValue();
  const res = await search(state.selected, q.version, q.vectors[q.version], q.dim, k);
  const box = clear($("results"));
  for (const hit of res.results[0]) box.append(card(hit, q.id));
  box.setAttribute("data-collection", state.selected);
  box.setAttribute("data-query", q.label);
  $("search-routes").textContent = routesLine(res, state.selected);
}

async function vectorsOfItem(id) {
  // the item's stored vector of every version it has, looked up by id in every collection
  const found = {};
  let own = null;
  const order = [state.selected, ...state.collections.filter((c) => c !== state.selected)];
  for (const name of order) {
    const r = await api("POST", "/collections/" + seg(name) + "/points/get", { ids: [id], binary: true });
    const p = r.points[0];
    if (!p) continue;
    if (name === state.selected) own = p;
    if (!(p.version in found)) found[p.version] = { b64: p.vector_b64, collection: name, metadata: p.metadata };
  }
  return { own, found };
}

async function searchItem(id) {
  if (!state.selected) throw new Error("no collection is selected");
  setStatus(`looking up item ${id}…`);
  const { own, found } = await vectorsOfItem(id);
  if (!own) throw new Error(`item ${id} is not in collection ${state.selected}`);
  const vectors = Object.fromEntries(Object.entries(found).map(([v, f]) => [v, f.b64]));
  // search with the item's vector of a version that reaches every segment, its own when it does
  const segs = Object.keys(segmentCounts(state.selected));
  const reachesAll = (q) => segs.every((s) => howReached(q, s, state.selected).ok);
  const version = reachesAll(own.version) ? own.version : (versionOrder().reverse().find((v) => v in vectors && reachesAll(v)) || own.version);
  state.query = { label: `item #${id}`, id, version, stored: own.version, metadata: own.metadata, vectors,
    dim: state.versions.find((v) => v.version_id === version).dim };
  renderQuery();
  await runMainSearch();
  setStatus(`item ${id}: more like this in ${state.selected}`);
}

// -- vector files --------------------------------------------------------------------------------------
function parseNpy(buf) {
  const u8 = new Uint8Array(buf);
  const magic = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59];
  if (u8.length < 10 || magic.some((b, i) => u8[i] !== b)) throw new Error("not a .npy file (no \\x93NUMPY header)");
  const dv = new DataView(buf);
  const major = u8[6];
  let hlen, off;
  if (major === 1) { hlen = dv.getUint16(8, true); off = 10; }
  else if (major === 2 || major === 3) { hlen = dv.getUint32(8, true); off = 12; }
  else throw new Error(`unsupported .npy format version ${major}`);
  const header = new TextDecoder("latin1").decode(u8.subarray(off, off + hlen));
  const descr = /'descr':\s*'([^']+)'/.exec(header);
  const fortran = /'fortran_order':\s*(True|False)/.exec(header);
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header);
  if (!descr || !fortran || !shape) throw new Error("cannot read the .npy header");
  const dims = shape[1].split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  if (!dims.every((d) => Number.isInteger(d) && d > 0) || dims.length < 1 || dims.length > 2) {
    throw new Error(`a vector file must hold a (D,) or (N, D) array, got shape (${shape[1]})`);
  }
  const [rows, dim] = dims.length === 1 ? [1, dims[0]] : dims;
  if (fortran[1] === "True" && rows > 1) throw new Error("Fortran-ordered arrays are not supported: save with C order");
  const size = { "<f4": 4, "<f8": 8 }[descr[1]];
  if (!size) throw new Error(`vectors must be float32 (<f4) or float64 (<f8), got ${descr[1]}`);
  const start = off + hlen;
  if (buf.byteLength < start + rows * dim * size) throw new Error("the .npy file is shorter than its header says");
  const first = new Float32Array(dim);
  for (let j = 0; j < dim; j++) {
    first[j] = size === 4 ? dv.getFloat32(start + 4 * j, true) : dv.getFloat64(start + 8 * j, true);
  }
  return { rows, dim, vector: first };
}

function parseJsonVector(text) {
  let data;
  try { data = JSON.parse(text); } catch (e) { throw new Error("the file is neither .npy nor JSON: " + e.message); }
  const row = Array.isArray(data) && Array.isArray(data[0]) ? data[0] : data;
  if (!Array.isArray(row) || !row.length || !row.every((x) => typeof x === "number" && Number.isFinite(x))) {
    throw new Error("a JSON vector file must hold a list of finite numbers (or a list of such lists)");
  }
  return { rows: Array.isArray(data[0]) ? data.length : 1, dim: row.length, vector: Float32Array.from(row) };
}

function toBase64(f32) {
  const bytes = new Uint8Array(f32.length * 4);
  const dv = new DataView(bytes.buffer);
  f32.forEach((x, j) => dv.setFloat32(4 * j, x, true));
  let bin = "";
  for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(bin);
}

function renderFileVersions(dim) {
  const sel = clear($("file-version"));
  const fits = state.versions.filter((v) => dim === undefined || v.dim === dim);
  for (const v of fits) sel.append(el("option", { value: v.version_id, text: `${v.version_id} (${v.dim}-d)` }));
}

async function readVectorFile() {
  const file = $("vector-file").files[0];
  if (!file) throw new Error("choose a vector file first");
  const buf = await file.arrayBuffer();
  const head = new Uint8Array(buf.slice(0, 1));
  return head[0] === 0x93 ? parseNpy(buf) : parseJsonVector(new TextDecoder().decode(buf));
}

async function searchFile() {
  if (!state.selected) throw new Error("no collection is selected");
  const parsed = await readVectorFile();
  const version = $("file-version").value;
  const v = state.versions.find((x) => x.version_id === version);
  if (!v) throw new Error(`no registered version has dimension ${parsed.dim}`);
  if (v.dim !== parsed.dim) throw new Error(`the file's vectors are ${parsed.dim}-d but ${version} is ${v.dim}-d`);
  const name = $("vector-file").files[0].name;
  state.query = { label: `${name}` + (parsed.rows > 1 ? ` (row 0 of ${parsed.rows})` : ""), id: null, version,
    metadata: undefined, vectors: { [version]: toBase64(parsed.vector) }, dim: parsed.dim };
  renderQuery();
  await runMainSearch();
  setStatus(`searched ${state.selected} with ${name}`);
}

// -- side by side ----------------------------------------------------------------------------------------
function composition(name) {
  const segs = Object.keys(segmentCounts(name));
  if (!segs.length) return "empty";
  return segs.length === 1 ? `all ${segs[0]}` : `mixed: ${segs.join(" + ")}`;
}

function defaultColumns() {
  const sel = state.selected;
  if (!sel) return [];
  const segs = Object.keys(segmentCounts(sel));
  const order = versionOrder();
  const canQuery = (q, s) => q === s || Boolean((state.routes.query[q] || {})[s]);
  // an (old, new) pair the new version can query: both in the selected collection if it is mixed
  let pair = null;
  for (const n of [...order].reverse()) {
    for (const o of order) {
      if (o !== n && canQuery(n, o) && (segs.includes(o) || segs.includes(n))) { pair = pair || [o, n]; }
    }
  }
  if (!pair) return order.filter((q) => segs.some((s) => canQuery(q, s))).map((q) => ({ collection: sel, version: q }));
  const [old, neu] = pair;
  const only = (v) => state.collections.find((c) => {
    const s = Object.keys(segmentCounts(c));
    return s.length === 1 && s[0] === v;
  });
  const oldGallery = only(old) || sel;
  const cols = [{ collection: oldGallery, version: old }, { collection: oldGallery, version: neu }];
  if (sel !== oldGallery) cols.push({ collection: sel, version: neu });
  const newGallery = only(neu);
  if (newGallery && newGallery !== sel) cols.push({ collection: newGallery, version: neu });
  return cols;
}

function renderColumnEditor() {
  const box = clear($("columns"));
  state.columns.forEach((col, i) => {
    const cs = el("select", { "data-index": i, class: "column-collection" });
    for (const n of state.collections) cs.append(el("option", { value: n, text: `${n} (${composition(n)})` }));
    cs.value = col.collection;
    cs.addEventListener("change", () => { col.collection = cs.value; });
    const vs = el("select", { "data-index": i, class: "column-version" });
    for (const v of state.versions) vs.append(el("option", { value: v.version_id, text: v.version_id }));
    vs.value = col.version;
    vs.addEventListener("change", () => { col.version = vs.value; });
    const rm = el("button", { type: "button", text: "remove" });
    rm.addEventListener("click", () => { state.columns.splice(i, 1); renderColumnEditor(); });
    box.append(el("div", { class: "column-editor" }, el("span", { text: `column ${i + 1}: query of` }), vs,
      el("span", { text: "in" }), cs, rm));
  });
}

function columnTitle(col) {
  const segs = Object.keys(segmentCounts(col.collection));
  let gallery = composition(col.collection);
  if (segs.length === 1) gallery = segs[0] === col.version ? "its own gallery" : `the ${segs[0]} gallery`;
  else if (segs.length > 1) gallery = "the mixed gallery";
  return `${col.version} model, ${gallery}`;
}

async function runCompare() {
  const q = state.query;
  if (!q) throw new Error("search first (an item or a vector file): the comparison runs that query");
  const k = kValue();
  const box = clear($("compare"));
  box.setAttribute("data-query", q.label);
  for (const [i, col] of state.columns.entries()) {
    const column = el("div", { class: "column", "data-index": i, "data-collection": col.collection, "data-version": col.version });
    column.append(el("h3", { text: columnTitle(col) }));
    column.append(el("div", { class: "hint", text: `query ${col.version} → collection ${col.collection} (${composition(col.collection)})` }));
    box.append(column);
    const b64 = q.vectors[col.version];
    if (!b64) {
      column.append(el("p", { class: "error", text: `${q.label} has no vector of ${col.version}` +
        (q.id !== null ? " in any collection" : " (an uploaded vector has only the version it was given as)") }));
      continue;
    }
    const dim = state.versions.find((v) => v.version_id === col.version).dim;
    try {
      const res = await search(col.collection, col.version, b64, dim, k);
      column.append(el("div", { class: "routes-line", text: routesLine(res, col.collection) }));
      const results = el("div", { class: "results" });
      for (const hit of res.results[0]) results.append(card(hit, q.id));
      column.append(results);
    } catch (e) {
      column.append(el("p", { class: "error", text: e.message }));
    }
  }
  setStatus(`compared ${q.label} in ${state.columns.length} column(s)`);
}

// -- the report --------------------------------------------------------------------------------------------
function inline(text) {
  // images, links, **bold** and `code`: everything else stays text
  const frag = document.createDocumentFragment();
  const re = /!\[([^\]]*)\]\(([^)\s]+)\)|\[([^\]]+)\]\(([^)\s]+)\)|\*\*([^*]+)\*\*|`([^`]+)`/g;
  let last = 0, m;
  while ((m = re.exec(text)) !== null) {
    if (m.index > last) frag.append(document.createTextNode(text.slice(last, m.index)));
    if (m[2] !== undefined) {
      const src = m[2];
      if (/^[A-Za-z0-9][A-Za-z0-9._\/-]*$/.test(src) && !src.split("/").includes("..")) {
        const img = el("img", { alt: m[1] });
        img.addEventListener("error", () => img.replaceWith(el("em", { text: `[${m[1]}: ${src} unavailable]` })));
        img.src = "/ui/report/file?path=" + encodeURIComponent(src);
        frag.append(img);
      } else frag.append(document.createTextNode(m[0]));
    } else if (m[4] !== undefined) {
      frag.append(/^https?:\/\//i.test(m[4])
        ? el("a", { href: m[4], rel: "noopener noreferrer", target: "_blank", text: m[3] })
        : document.createTextNode(m[3]));
    } else if (m[5] !== undefined) frag.append(el("strong", { text: m[5] }));
    else frag.append(el("code", { text: m[6] }));
    last = re.lastIndex;
  }
  if (last < text.length) frag.append(document.createTextNode(text.slice(last)));
  return frag;
}

function renderMarkdown(md, box) {
  const lines = md.replace(/\r\n?/g, "\n").split("\n");
  let para = [];
  const flush = () => { if (para.length) { box.append(el("p", {}, inline(para.join(" ")))); para = []; } };
  const cells = (line) => line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (/^```/.test(line)) {
      flush();
      const code = [];
      while (++i < lines.length && !/^```/.test(lines[i])) code.push(lines[i]);
      box.append(el("pre", {}, el("code", { text: code.join("\n") })));
    } else if (/^#{1,6}\s/.test(line)) {
      flush();
      const level = Math.min(6, line.match(/^#+/)[0].length + 1);
      box.append(el("h" + level, {}, inline(line.replace(/^#+\s*/, ""))));
    } else if (/^\s*\|/.test(line)) {
      flush();
      const table = el("table");
      const head = cells(line);
      table.append(el("tr", {}, ...head.map((c) => el("th", {}, inline(c)))));
      if (i + 1 < lines.length && /^\s*\|?\s*:?-+/.test(lines[i + 1])) i++;
      while (i + 1 < lines.length && /^\s*\|/.test(lines[i + 1])) {
        i++;
        table.append(el("tr", {}, ...cells(lines[i]).map((c) => el("td", {}, inline(c)))));
      }
      box.append(table);
    } else if (/^\s*[-*]\s+/.test(line)) {
      flush();
      const ul = el("ul");
      i--;
      while (i + 1 < lines.length && /^\s*[-*]\s+/.test(lines[i + 1])) {
        i++;
        ul.append(el("li", {}, inline(lines[i].replace(/^\s*[-*]\s+/, ""))));
      }
      box.append(ul);
    } else if (!line.trim()) flush();
    else para.push(line.trim());
  }
  flush();
}

async function loadReport() {
  const r = await fetch("/ui/report/report.md");
  if (!r.ok) throw new Error(`report.md: HTTP ${r.status}`);
  const box = clear($("report"));
  renderMarkdown(await r.text(), box);
  $("report-section").hidden = false;
}

// -- writes ---------------------------------------------------------------------------------------------
async function snapshot() {
  const out = $("write-status");
  out.className = "";
  out.textContent = "writing a snapshot…";
  try {
    const r = await api("POST", "/collections/" + seg(state.selected) + "/snapshot");
    out.textContent = r.snapshots.map((s) => `snapshot ${s.name} (seq ${s.seq})`).join(", ");
  } catch (e) {
    out.className = "error";
    out.textContent = e.message;
  }
}

// -- wiring ---------------------------------------------------------------------------------------------
function showError(e) {
  setStatus(e && e.message ? e.message : String(e), true);
}

document.addEventListener("DOMContentLoaded", () => {
  $("collection").addEventListener("change", () => selectCollection($("collection").value));
  $("item-search").addEventListener("click", () => {
    const id = Number($("item-id").value);
    if (!$("item-id").value || !Number.isSafeInteger(id) || id < 0) { showError(new Error("give an item id (a non-negative integer)")); return; }
    searchItem(id).catch(showError);
  });
  $("vector-file").addEventListener("change", () => {
    readVectorFile().then((p) => { renderFileVersions(p.dim); if (!$("file-version").value) showError(new Error(`no registered version has dimension ${p.dim}`)); })
      .catch(showError);
  });
  $("file-search").addEventListener("click", () => searchFile().catch(showError));
  $("add-column").addEventListener("click", () => {
    state.columns.push({ collection: state.selected, version: state.query ? state.query.version : (state.versions[0] || {}).version_id });
    renderColumnEditor();
  });
  $("compare-run").addEventListener("click", () => runCompare().catch(showError));
  $("snapshot").addEventListener("click", () => snapshot());
  loadAll().then(() => document.body.setAttribute("data-ready", "true")).catch(showError);
});
