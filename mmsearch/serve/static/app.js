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
let seenGeneration = null;
let inflight = 0;  // an open album re-runs when the index changes (a watcher added photos)
const LIVE_MS = 2000;

function blank() {
  return { q: "", ids: [], folder: "", ext: "", after: "", until: "", mode: "", rerank: null, upload: null,
    good: null, sort: "relevance", album: "" };
}

// good matches only: on by default where the index is calibrated (info.calibrated), unless the URL says good=0
function goodOnly(s) { return s.good !== null ? s.good : Boolean(info && info.calibrated); }

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
  for (const k of ["folder", "ext", "after", "until", "mode"]) s[k] = p.get(k) || "";
  s.rerank = p.has("rerank") ? p.get("rerank") === "1" : null;
  s.good = p.has("good") ? p.get("good") === "1" : null;
  s.sort = p.get("sort") === "date" ? "date" : "relevance";
  s.album = p.get("album") || "";
  const key = history.state && history.state.upload;
  s.upload = key && uploads.has(key) ? key : null;
  return s;
}

function queryString(s, extra) {
  const p = new URLSearchParams();
  if (s.q) p.set("q", s.q);
  for (const i of s.ids) p.append("id", i);
  for (const k of ["folder", "ext", "after", "until", "mode"]) if (s[k]) p.set(k, s[k]);
  if (s.rerank !== null) p.set("rerank", s.rerank ? "1" : "0");
  if (s.good !== null) p.set("good", s.good ? "1" : "0");
  if (s.sort !== "relevance") p.set("sort", s.sort);
  if (s.album) p.set("album", s.album);
  for (const [k, v] of Object.entries(extra || {})) p.set(k, v);
  return p.toString();
}

// what the API takes: the page's own keys (good, album) become good_only, or go into the path
function apiQuery(s, extra) {
  const p = new URLSearchParams(queryString(Object.assign({}, s, { good: null, album: "", sort: "relevance" }), extra));
  p.set("good_only", goodOnly(s) ? "true" : "false");
  p.set("sort", s.sort);
  return p.toString();
}

function hasQuery(s) { return Boolean(s.q || s.ids.length || s.upload || s.album); }

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
  $("mode").value = state.mode;
  $("rerank").checked = state.rerank !== false;
  $("good").checked = goodOnly(state);
  $("sort").value = state.sort;
  $("good").disabled = $("sort").disabled = Boolean(state.album);  // an album has its own
  document.querySelectorAll("#albums a").forEach((a) => a.classList.toggle("open", a.dataset.name === state.album));
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
  const qs = apiQuery(state, { k: PAGE, offset });
  inflight++;
  try {
    let data;
    if (state.album) {
      data = await api(`/api/albums/${encodeURIComponent(state.album)}?k=${PAGE}&offset=${offset}`);
      seenGeneration = data.generation;
    } else if (state.upload) {
      const form = new FormData();
      form.append("image", uploads.get(state.upload), "query-image");
      data = await api("/api/search?" + qs, { method: "POST", body: form });
    } else {
      data = await api("/api/search?" + qs);
    }
    if (mine !== busy) return;  // a newer search started meanwhile
    if (!append) $("grid").replaceChildren();  // a live album refresh replaces what it showed
    $("no-good").hidden = !data.no_good_match;
    renderHits(data.hits, data.no_good_match);
    offset += data.hits.length;
    $("more").hidden = !data.more;
    const n = offset;
    const what = data.no_good_match ? "closest results" : (goodOnly(state) && data.calibrated ? "good matches" : "results");
    const head = data.album ? `Album “${data.album.name}” (“${data.album.query}”): ` : "";
    const fresh = data.album && data.added_since_saved ? ` · ${data.added_since_saved} new since it was saved` : "";
    // a sharded index answers without the shards that are down, and says which: so does the page
    const partial = data.partial ? ` · partial: ${data.missing.join(", ")} did not answer` : "";
    setStatus((n ? `${head}${n}${data.more ? "+" : ""} ${what}${fresh} · ${Math.round(data.took_ms)} ms` +
      (data.reranked ? " · re-ranked" : "") + (state.sort === "date" && !data.album ? " · newest first" : "")
      : head + "No results. Try other words or fewer filters.") + partial, Boolean(data.partial));
  } catch (err) {
    if (mine === busy) setStatus(err.message, true);
  } finally {
    inflight--;
  }
}

function setStatus(text, error) {
  $("status").textContent = text;
  $("status").classList.toggle("error", Boolean(error));
}

// ---- rendering ------------------------------------------------------------------------------------
function renderHits(hits, poor) {
  const grid = $("grid");
  for (const h of hits) {
    const card = document.createElement("button");
    card.type = "button";
    card.className = "card" + (h.good ? " good" : "") + (poor ? " poor" : "");
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
    score.title = (h.itm === null ? `similarity ${h.similarity.toFixed(3)}` :
      `re-ranked: ITM ${h.itm.toFixed(2)}, similarity ${h.similarity.toFixed(3)}`) +
      (h.matches && h.matches.length ? " · words matched" : "") +
      (h.calibrated === null ? "" : ` · match ${h.calibrated.toFixed(1)}${h.good ? " (good)" : ""}`);
    if (h.matches && h.matches.length) card.classList.add("worded");
    meta.append(name, score);
    card.append(img, meta);
    if (h.kind === "video") {  // a moment of a video: where it starts
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = "▶ " + clock(h.start_s);
      badge.title = `shot ${clock(h.start_s)}–${clock(h.end_s)} of ${clock(h.duration_s)}`;
      card.append(badge);
    }
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
  $("d-file").href = $("d-open").href = hit.file || `/api/images/${hit.id}/file`;
  showMoment(hit);
  $("d-like").onclick = () => go(Object.assign(blank(), filtersOf(state), { ids: [hit.id] }));
  $("d-texts").replaceChildren();
  showWords(hit, null);
  panel.hidden = false;
  panel.dataset.id = hit.id;
  document.body.classList.add("with-detail");
  $("close").focus();
  // every line OCR read shows as soon as it arrives: the captions below may wait on the image tower
  api(`/api/images/${hit.id}/words`).then((words) => {
    if (panel.dataset.id === String(hit.id)) showWords(hit, words);
  }).catch((err) => {  // the matched lines stay; say why the rest is missing, as the request below does
    if (panel.dataset.id === String(hit.id)) $("d-path").textContent = hit.path + " — " + err.message;
  });
  try {
    const [meta, texts] = await Promise.all([api(`/api/images/${hit.id}`), api(`/api/images/${hit.id}/texts?k=5`)]);
    if (panel.dataset.id !== String(hit.id)) return;
    const when = meta.taken_at || meta.mtime;
    $("d-date").textContent = new Date(when * 1000).toLocaleString() + (meta.taken_at ? " (EXIF)" : " (file date)");
    $("d-size").textContent = `${meta.width} × ${meta.height} px · ${bytes(meta.size)}` +
      (meta.kind === "video" ? ` · ${clock(meta.duration_s)} · shot ${clock(meta.start_s)}–${clock(meta.end_s)}` : "");
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

// ---- why a hit matched: the words in the image, the matched ones marked and boxed ---------------------
function marked(text, spans) {
  const frag = document.createDocumentFragment();
  let last = 0;
  for (const [s, e] of spans || []) {
    if (s < last) continue;
    frag.append(document.createTextNode(text.slice(last, s)));
    const m = document.createElement("mark");
    m.textContent = text.slice(s, e);
    frag.append(m);
    last = e;
  }
  frag.append(document.createTextNode(text.slice(last)));
  return frag;
}

function showWords(hit, words) {
  const list = $("d-words");
  const boxes = $("d-boxes");
  list.replaceChildren();
  boxes.replaceChildren();
  const found = hit.matches || [];
  const byLine = new Map(found.filter((m) => m.field === "ocr").map((m) => [m.line, m]));
  const lines = words ? words.lines : found.filter((m) => m.field === "ocr").map((m) =>
    ({ line: m.line, text: m.text, box: m.box }));
  for (const ln of lines.slice(0, 60)) {
    const m = byLine.get(ln.line);
    const li = document.createElement("li");
    li.append(marked(ln.text, m ? m.spans : []));
    if (m) li.classList.add("matched");
    list.append(li);
    if (m && ln.box) {
      const poly = document.createElementNS("http://www.w3.org/2000/svg", "polygon");
      poly.setAttribute("points", ln.box.map(([x, y]) => `${x},${y}`).join(" "));
      boxes.append(poly);
    }
  }
  for (const m of found.filter((x) => x.field !== "ocr")) {
    const li = document.createElement("li");
    li.classList.add("matched");
    const k = document.createElement("span");
    k.className = "k";
    k.textContent = m.field === "name" ? "file" : m.key;
    li.append(k, marked(m.text, m.spans));
    list.append(li);
  }
  if (words && words.ocr_status === "error") {
    const li = document.createElement("li");
    li.textContent = "OCR failed on this image: " + (words.ocr_error || "");
    list.append(li);
  }
  $("d-words-wrap").hidden = !list.children.length;
}

// ---- a video's moment: play it from the shot's start; its other moments are chips on a timeline -----
function clock(s) {
  s = Math.max(0, Math.floor(s || 0));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = String(s % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${sec}` : `${String(m).padStart(2, "0")}:${sec}`;
}

function seek(video, t) {
  const go = () => { video.currentTime = t; video.play().catch(() => {}); };
  if (video.readyState >= 1) go(); else video.addEventListener("loadedmetadata", go, { once: true });
}

function showMoment(hit) {
  const video = $("d-video"), line = $("d-timeline");
  const isVideo = hit.kind === "video";
  $("d-open").hidden = isVideo;
  video.hidden = line.hidden = !isVideo;
  line.replaceChildren();
  if (!isVideo) { video.pause(); return; }
  if (video.getAttribute("src") !== hit.file) video.src = hit.file;  // ranges of the original file
  video.dataset.start = hit.start_s;
  seek(video, hit.start_s);
  const moments = hit.moments && hit.moments.length ? hit.moments : [hit];
  moments.forEach((m, i) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "moment" + (i === 0 ? " best" : "");
    b.style.left = `${Math.min(100, 100 * m.start_s / Math.max(hit.duration_s || 1, 0.001))}%`;
    b.textContent = clock(m.start_s);
    b.title = `${clock(m.start_s)}–${clock(m.end_s)} · score ${m.score.toFixed(3)}`;
    b.addEventListener("click", () => seek(video, m.start_s));
    line.append(b);
  });
}

function closeDetail() {
  const panel = $("detail");
  if (panel.hidden) return;
  $("d-video").pause();
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
  return { folder: s.folder, ext: s.ext, after: s.after, until: s.until, mode: s.mode, rerank: s.rerank,
    good: s.good, sort: s.sort };
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
  for (const id of ["folder", "ext", "after", "until", "mode"]) {
    $(id).addEventListener("change", () => {
      const next = Object.assign({}, state, { [id]: $(id).value.trim() });
      hasQuery(next) ? go(next) : (state = next);
    });
  }
  $("rerank").addEventListener("change", () => go(Object.assign({}, state, { rerank: $("rerank").checked })));
  $("good").addEventListener("change", () => go(Object.assign({}, state, { good: $("good").checked })));
  $("sort").addEventListener("change", () => go(Object.assign({}, state, { sort: $("sort").value })));
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
  $("mode-wrap").hidden = !(info.words && info.words.documents);
  $("good-wrap").hidden = !info.calibrated;
  if (state.folder || state.ext || state.after || state.until || state.mode) $("filters").hidden = false;
  await loadAlbums();
}

async function loadAlbums() {
  let data;
  try { data = await api("/api/albums"); } catch (err) { return; }
  const nav = $("albums");
  nav.querySelectorAll("a").forEach((a) => a.remove());
  for (const a of data.albums) {
    const link = document.createElement("a");
    link.href = "?album=" + encodeURIComponent(a.name);
    link.dataset.name = a.name;
    link.textContent = a.name;
    link.title = `“${a.query}”, ${a.good_only ? "good matches" : "all results"} by ${a.sort}`;
    link.addEventListener("click", (e) => { e.preventDefault(); go(Object.assign(blank(), { album: a.name })); });
    nav.append(link);
  }
  nav.hidden = !data.albums.length;
  showState();
}

// an open album is a live result: when the catalog's generation moves (photos indexed), it is run again
async function liveAlbum() {
  if (!state.album || inflight || seenGeneration === null) return;
  try {
    const h = await api("/api/health");
    if (state.album && !inflight && h.generation !== seenGeneration) search(false);
  } catch (err) { /* the next tick tries again */ }
}

wire();
state = stateFromURL();
history.replaceState({ upload: null }, "", location.href);
showState();
loadInfo().then(() => { showState(); search(false); });
setInterval(liveAlbum, LIVE_MS);
