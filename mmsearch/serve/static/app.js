// mmsearch page: plain JS, no build step, no network beyond this server.
"use strict";
const PAGE = 24;
const $ = (id) => document.getElementById(id);
const uploads = new Map();  // history key -> uploaded Blob (uploads are not kept in URLs)
let uploadSeq = 0;
let state = blank();
let offset = 0;
let busy = 0;
let info = null;
let lastFocus = null;

function blank() {
  return { q: "", ids: [], folder: "", ext: "", after: "", until: "", rerank: null, upload: null };
}

// ---- query terms: the same grammar as the CLI ("2:dog + beach - people") ----------------------
function parseTerms(q) {
  const parts = (" " + q.trim()).split(/(?:^|\s+)([+-])(?:\s+|$)/);
  const out = [];
  for (let i = 0; i < parts.length; i += 2) {
    const sign = i === 0 ? "+" : parts[i - 1];
    let body = parts[i].trim();
    if (!body) continue;
    let weight = 1;
    const m = body.match(/^\s*(-?\d+(?:\.\d+)?)\s*:\s*(.+?)\s*$/);
    if (m) { weight = parseFloat(m[1]); body = m[2]; }
    out.push({ weight: sign === "-" ? -weight : weight, text: body });
  }
  return out;
}

function joinTerms(terms) {
  return terms.map((t, i) => {
    const w = Math.abs(t.weight);
    const body = (w === 1 ? "" : w + ":") + t.text;
    if (i === 0) return t.weight < 0 ? "- " + body : body;
    return (t.weight < 0 ? "- " : "+ ") + body;
  }).join(" ");
}

// ---- URL <-> state --------------------------------------------------------------------------
function stateFromURL() {
  const p = new URLSearchParams(location.search);
  const s = blank();
  s.q = p.get("q") || "";
  s.ids = p.getAll("id").map(Number).filter((n) => Number.isInteger(n) && n >= 0);
  for (const k of ["folder", "ext", "after", "until"]) s[k] = p.get(k) || "";
  s.rerank = p.has("rerank") ? p.get("rerank") === "1" : null;
  const key = history.state && history.state.upload;
  s.upload = key && uploads.has(key) ? key : null;
  return s;
}

function queryString(s, extra) {
  const p = new URLSearchParams();
  if (s.q) p.set("q", s.q);
  for (const i of s.ids) p.append("id", i);
  for (const k of ["folder", "ext", "after", "until"]) if (s[k]) p.set(k, s[k]);
  if (s.rerank !== null) p.set("rerank", s.rerank ? "1" : "0");
  for (const [k, v] of Object.entries(extra || {})) p.set(k, v);
  return p.toString();
}

function hasQuery(s) { return Boolean(s.q || s.ids.length || s.upload); }

function go(next, push = true) {
  state = next;
  const qs = queryString(state, state.upload ? { image: "upload" } : {});
  const url = location.pathname + (qs ? "?" + qs : "");
  const hist = { upload: state.upload };
  if (push) history.pushState(hist, "", url); else history.replaceState(hist, "", url);
  showState();
  search(false);
}

function showState() {
  $("q").value = state.q;
  $("folder").value = state.folder;
  $("ext").value = state.ext;
  $("after").value = state.after;
  $("until").value = state.until;
  $("rerank").checked = state.rerank !== false;
  renderChips();
}

// ---- talking to the API -------------------------------------------------------------------------
async function api(path, options) {
  const res = await fetch(path, Object.assign({ credentials: "same-origin" }, options));
  let body = null;
  try { body = await res.json(); } catch (e) { body = null; }
  if (!res.ok) throw new Error((body && body.error) || `${res.status} ${res.statusText}`);
  return body;
}

async function search(append) {
  closeDetail();
  if (!append) { offset = 0; $("grid").replaceChildren(); }
  $("more").hidden = true;
  const lostUpload = !state.upload && new URLSearchParams(location.search).get("image") === "upload";
  $("empty").hidden = hasQuery(state) || lostUpload;
  if (lostUpload) { setStatus("An uploaded image is not kept across reloads: drop or pick it again.", true); return; }
  if (!hasQuery(state)) { setStatus(""); return; }
  const mine = ++busy;
  setStatus(state.upload ? "Embedding the image…" : "Searching…");
  const qs = queryString(state, { k: PAGE, offset });
  try {
    let data;
    if (state.upload) {
      const form = new FormData();
      form.append("image", uploads.get(state.upload), "query-image");
      data = await api("/api/search?" + qs, { method: "POST", body: form });
    } else {
      data = await api("/api/search?" + qs);
    }
    if (mine !== busy) return;  // a newer search started meanwhile
    renderHits(data.hits);
    offset += data.hits.length;
    $("more").hidden = !data.more;
    const n = offset;
    // a sharded index answers without the shards that are down, and says which: so does the page
    const partial = data.partial ? ` · partial: ${data.missing.join(", ")} did not answer` : "";
    setStatus((n ? `${n}${data.more ? "+" : ""} results · ${Math.round(data.took_ms)} ms` +
      (data.reranked ? " · re-ranked" : "") : "No results. Try other words or fewer filters.") + partial,
      Boolean(data.partial));
  } catch (err) {
    if (mine === busy) setStatus(err.message, true);
  }
}

function setStatus(text, error) {
  $("status").textContent = text;
  $("status").classList.toggle("error", Boolean(error));
}

// ---- rendering ------------------------------------------------------------------------------------
function renderHits(hits) {
  const grid = $("grid");
  for (const h of hits) {
    const card = document.createElement("button");
    card.type = "button";
    card.className = "card";
    card.dataset.id = h.id;
    card.title = h.path;
    const img = document.createElement("img");
    img.src = h.thumbnail;
    img.alt = h.name;
    img.loading = "lazy";
    img.decoding = "async";
    const meta = document.createElement("span");
    meta.className = "meta";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = h.name;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = h.score.toFixed(3);
    score.title = h.itm === null ? `similarity ${h.similarity.toFixed(3)}` :
      `re-ranked: ITM ${h.itm.toFixed(2)}, similarity ${h.similarity.toFixed(3)}`;
    meta.append(name, score);
    card.append(img, meta);
    card.addEventListener("click", () => openDetail(h, card));
    grid.append(card);
  }
}

function chip(label, weight, onRemove, thumb) {
  const el = document.createElement("span");
  el.className = "chip" + (weight < 0 ? " neg" : "");
  if (thumb) { const i = document.createElement("img"); i.src = thumb; i.alt = ""; el.append(i); }
  if (weight !== 1) {
    const w = document.createElement("span");
    w.className = "w";
    w.textContent = (weight < 0 ? "−" : "+") + (Math.abs(weight) === 1 ? "" : Math.abs(weight));
    el.append(w);
  }
  el.append(document.createTextNode(label));
  const x = document.createElement("button");
  x.type = "button";
  x.textContent = "×";
  x.setAttribute("aria-label", "Remove " + label);
  x.addEventListener("click", onRemove);
  el.append(x);
  return el;
}

function renderChips() {
  const box = $("chips");
  box.replaceChildren();
  const terms = state.q ? parseTerms(state.q) : [];
  terms.forEach((t, i) => box.append(chip(t.text, t.weight, () => {
    go(Object.assign({}, state, { q: joinTerms(terms.filter((_, j) => j !== i)) }));
  })));
  for (const id of state.ids) {
    box.append(chip(`image #${id}`, 1, () => go(Object.assign({}, state, { ids: state.ids.filter((x) => x !== id) })),
      `/api/images/${id}/thumb?size=128`));
  }
  if (state.upload) {
    box.append(chip("uploaded image", 1, () => go(Object.assign({}, state, { upload: null })),
      URL.createObjectURL(uploads.get(state.upload))));
  }
}

// ---- the detail panel -------------------------------------------------------------------------------
async function openDetail(hit, card) {
  lastFocus = card;
  document.querySelectorAll(".card.selected").forEach((c) => c.classList.remove("selected"));
  card.classList.add("selected");
  const panel = $("detail");
  $("d-img").src = hit.thumbnail.replace("size=256", "size=512");
  $("d-img").alt = hit.name;
  $("d-name").textContent = hit.name;
  $("d-path").textContent = hit.path;
  $("d-size").textContent = hit.width && hit.height ? `${hit.width} × ${hit.height}` : "";
  $("d-date").textContent = "";
  $("d-score").textContent = `${hit.score.toFixed(3)} (similarity ${hit.similarity.toFixed(3)}` +
    (hit.itm === null ? ")" : `, ITM ${hit.itm.toFixed(2)})`);
  $("d-file").href = $("d-open").href = `/api/images/${hit.id}/file`;
  $("d-like").onclick = () => go(Object.assign(blank(), filtersOf(state), { ids: [hit.id] }));
  $("d-texts").replaceChildren();
  panel.hidden = false;
  panel.dataset.id = hit.id;
  document.body.classList.add("with-detail");
  $("close").focus();
  try {
    const [meta, texts] = await Promise.all([api(`/api/images/${hit.id}`), api(`/api/images/${hit.id}/texts?k=5`)]);
    if (panel.dataset.id !== String(hit.id)) return;
    const when = meta.taken_at || meta.mtime;
    $("d-date").textContent = new Date(when * 1000).toLocaleString() + (meta.taken_at ? " (EXIF)" : " (file date)");
    $("d-size").textContent = `${meta.width} × ${meta.height} px · ${bytes(meta.size)}`;
    const list = $("d-texts");
    if (!texts.texts.length) {
      const li = document.createElement("li");
      li.textContent = texts.corpus ? "No captions." : "No text corpus (mmsearch texts add FILE).";
      list.append(li);
    }
    for (const t of texts.texts) {
      const li = document.createElement("li");
      li.textContent = t.text;
      const s = document.createElement("span");
      s.className = "s";
      s.textContent = t.score.toFixed(3);
      li.append(s);
      list.append(li);
    }
  } catch (err) {
    $("d-path").textContent = hit.path + " — " + err.message;
  }
}

function closeDetail() {
  const panel = $("detail");
  if (panel.hidden) return;
  panel.hidden = true;
  panel.dataset.id = "";
  document.body.classList.remove("with-detail");
  document.querySelectorAll(".card.selected").forEach((c) => c.classList.remove("selected"));
  if (lastFocus && document.body.contains(lastFocus)) lastFocus.focus();
}

function bytes(n) {
  return n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(0)} KB` : `${(n / 1048576).toFixed(1)} MB`;
}

function filtersOf(s) {
  return { folder: s.folder, ext: s.ext, after: s.after, until: s.until, rerank: s.rerank };
}

// ---- image queries: picker, drop, paste -----------------------------------------------------------
function searchByImage(file) {
  if (!file || !file.type.startsWith("image/")) { setStatus("That is not an image file.", true); return; }
  if (info && file.size > info.max_upload_bytes) {
    setStatus(`The image is too large (limit ${Math.round(info.max_upload_bytes / 1048576)} MB).`, true);
    return;
  }
  const key = "u" + (++uploadSeq) + "-" + Date.now();
  uploads.set(key, file);
  go(Object.assign(blank(), filtersOf(state), { upload: key }));
}

function wireImageInputs() {
  $("file").addEventListener("change", (e) => { searchByImage(e.target.files[0]); e.target.value = ""; });
  let depth = 0;
  const hasFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types || []).includes("Files");
  window.addEventListener("dragenter", (e) => { if (hasFiles(e)) { depth++; $("drop").hidden = false; } });
  window.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; $("drop").hidden = true; } });
  window.addEventListener("dragover", (e) => { if (hasFiles(e)) e.preventDefault(); });
  window.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    $("drop").hidden = true;
    if (e.dataTransfer.files.length) searchByImage(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const file = Array.from(e.clipboardData ? e.clipboardData.files : []).find((f) => f.type.startsWith("image/"));
    if (file) { e.preventDefault(); searchByImage(file); }
  });
}

// ---- wiring ----------------------------------------------------------------------------------------
function wire() {
  $("search").addEventListener("submit", (e) => {
    e.preventDefault();
    go(Object.assign(blank(), filtersOf(state), { q: $("q").value.trim() }));
  });
  $("more").addEventListener("click", () => search(true));
  $("close").addEventListener("click", closeDetail);
  $("toggle-filters").addEventListener("click", () => {
    const f = $("filters");
    f.hidden = !f.hidden;
    $("toggle-filters").setAttribute("aria-expanded", String(!f.hidden));
  });
  for (const id of ["folder", "ext", "after", "until"]) {
    $(id).addEventListener("change", () => {
      const next = Object.assign({}, state, { [id]: $(id).value.trim() });
      hasQuery(next) ? go(next) : (state = next);
    });
  }
  $("rerank").addEventListener("change", () => go(Object.assign({}, state, { rerank: $("rerank").checked })));
  $("clear-filters").addEventListener("click", () => go(Object.assign({}, state, filtersOf(blank()))));
  document.addEventListener("keydown", (e) => {
    const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName);
    if (e.key === "/" && !typing) { e.preventDefault(); $("q").focus(); $("q").select(); }
    if (e.key === "Escape") { closeDetail(); $("drop").hidden = true; }
  });
  window.addEventListener("popstate", () => { state = stateFromURL(); showState(); search(false); });
  wireImageInputs();
}

async function loadInfo() {
  try {
    info = await api("/api/info");
  } catch (err) {
    setStatus(err.message, true);
    return;
  }
  $("q").placeholder = `Search ${info.images.toLocaleString()} images: "dog on a beach", "2:dog + beach - people"`;
  const sel = $("folder");
  for (const f of info.folders) {
    const o = document.createElement("option");
    o.value = f;
    o.textContent = f;
    sel.append(o);
  }
  sel.value = state.folder;
  $("rerank-wrap").hidden = !info.rerank_available;
  if (state.folder || state.ext || state.after || state.until) $("filters").hidden = false;
}

wire();
state = stateFromURL();
history.replaceState({ upload: null }, "", location.href);
showState();
loadInfo();
search(false);
