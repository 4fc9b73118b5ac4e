// EM dashboard page. Plain JavaScript, no build step, no external resources.
// All text from the server is inserted as text nodes / textContent, never parsed as HTML.
"use strict";

const state = {
  me: null,
  codes: [],
  tileUrl: null,
  subjects: new Map(),   // id -> summary
  alerts: new Map(),     // id -> alert
  feed: null,
  trail: [],
  trailIndex: 0,
  playTimer: null,
  detail: null,
  editingZone: null,
  resolving: null,
};

const SEV_RANK = { critical: 3, high: 2, medium: 1, low: 0 };
const STATE_RANK = { open: 0, acknowledged: 1, resolved: 2 };
const DAYS = ["", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const KIND_WORDS = {
  inclusion_zone_exit: "Left inclusion zone",
  exclusion_zone_entry: "Entered exclusion zone",
  victim_proximity: "Near protected person",
  curfew_violation: "Curfew violation",
  no_fix_during_curfew: "No position during curfew",
  strap_tamper: "Strap tamper",
  case_tamper: "Case tamper",
  low_battery: "Low battery",
  battery_dead: "Battery dead",
  charger_not_connected: "Charger not connected",
  lost_communication: "Lost communication",
  gps_jamming_suspected: "GPS jamming suspected",
  device_clock_wrong: "Device clock wrong",
  unknown_alarm: "Unknown device alarm",
};

// ---------------------------------------------------------------- helpers

const $ = (id) => document.getElementById(id);

function h(tag, attrs, ...children) {
  const svgTags = ["svg", "g", "path", "circle", "line", "polyline", "rect", "text", "image", "title"];
  const el = svgTags.includes(tag)
    ? document.createElementNS("http://www.w3.org/2000/svg", tag)
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.setAttribute("class", v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function clear(el) { while (el.firstChild) el.removeChild(el.firstChild); return el; }

async function api(method, path, body) {
  const opts = {
    method,
    credentials: "same-origin",
    headers: { "X-Requested-With": "em-dashboard", "Accept": "application/json" },
  };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, opts);
  } catch (e) {
    toast("Network error: " + e.message);
    return { ok: false, status: 0, data: { error: "network error" } };
  }
  let data = null;
  const ct = res.headers.get("content-type") || "";
  if (ct.includes("application/json")) data = await res.json().catch(() => null);
  else data = await res.text();
  if (res.status === 401 && path !== "/api/login") showLogin("Your session has ended. Please sign in again.");
  return { ok: res.ok, status: res.status, data };
}

function errorText(r) {
  if (r.data && r.data.error) return r.data.error;
  if (r.data && r.data.errors) return Object.entries(r.data.errors).map(([k, v]) => `${k}: ${v}`).join("; ");
  return "Request failed (" + r.status + ")";
}

let toastTimer = null;
function toast(msg) {
  const t = $("toast");
  t.textContent = msg;
  t.classList.remove("hidden");
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => t.classList.add("hidden"), 4000);
}

function fmtTime(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

function ago(iso) {
  if (!iso) return "never";
  const s = Math.round((Date.now() - new Date(iso).getTime()) / 1000);
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " days ago";
}

function toLocalInput(d) {
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

function localInputToIso(v) {
  if (!v) return "";
  const d = new Date(v);
  return isNaN(d.getTime()) ? v : d.toISOString();
}

function hours(secs) { return (secs / 3600).toFixed(1); }

// Show per-field errors ({"errors": {field: message}}) next to elements with data-error=field.
function showFieldErrors(root, errors) {
  root.querySelectorAll("[data-error]").forEach((el) => { el.textContent = ""; });
  root.querySelectorAll(".invalid").forEach((el) => el.classList.remove("invalid"));
  const unplaced = [];
  for (const [field, msg] of Object.entries(errors || {})) {
    const slot = root.querySelector(`[data-error="${CSS.escape(field)}"]`);
    if (slot) slot.textContent = msg;
    else unplaced.push(`${field}: ${msg}`);
    const input = root.querySelector(`[data-field="${CSS.escape(field)}"]`);
    if (input) input.classList.add("invalid");
  }
  const general = root.querySelector('[data-error="_"]');
  if (general && unplaced.length) general.textContent = unplaced.join("; ");
}

// ---------------------------------------------------------------- login / session

function showLogin(message) {
  stopFeed();
  state.me = null;
  $("app-view").classList.add("hidden");
  $("login-view").classList.remove("hidden");
  $("login-error").textContent = message || "";
  $("login-username").focus();
}

async function login(ev) {
  ev.preventDefault();
  const btn = $("login-submit");
  btn.disabled = true;
  $("login-error").textContent = "";
  const r = await api("POST", "/api/login", {
    username: $("login-username").value,
    password: $("login-password").value,
  });
  btn.disabled = false;
  if (!r.ok) {
    $("login-error").textContent = r.status === 429 ? errorText(r) : "Wrong username or password.";
    return;
  }
  $("login-password").value = "";
  await boot();
}

async function logout() {
  await api("POST", "/api/logout");
  showLogin("You have signed out.");
}

async function boot() {
  const r = await api("GET", "/api/me");
  if (!r.ok) { showLogin(); return; }
  state.me = r.data.user;
  state.codes = r.data.resolution_codes || [];
  state.tileUrl = r.data.tile_url || null;
  $("login-view").classList.add("hidden");
  $("app-view").classList.remove("hidden");
  $("who-name").textContent = state.me.display_name;
  $("who-role").textContent = state.me.role;
  document.querySelectorAll("[data-roles]").forEach((el) => {
    el.classList.toggle("hidden", !el.dataset.roles.split(" ").includes(state.me.role));
  });
  document.querySelectorAll(".admin-only").forEach((el) => el.classList.toggle("hidden", state.me.role !== "admin"));
  switchTab("alerts");
  await loadSubjects();
  await loadAlerts();
  startFeed();
  loadOverviewMap();
}

// ---------------------------------------------------------------- tabs

function switchTab(name) {
  document.querySelectorAll(".tab").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  document.querySelectorAll(".tab-panel").forEach((p) => p.classList.toggle("hidden", p.id !== "tab-" + name));
  if (name === "alerts") loadOverviewMap();
  if (name === "subjects") renderSubjectList();
  if (name === "zones") initZoneTab();
  if (name === "reports") initReports();
  if (name === "audit") loadAudit();
  if (name === "admin") loadAdmin();
}

// ---------------------------------------------------------------- subjects

async function loadSubjects() {
  const r = await api("GET", "/api/subjects");
  if (!r.ok) return;
  state.subjects = new Map(r.data.map((s) => [s.id, s]));
  renderSubjectList();
}

function subjectName(id) {
  const s = state.subjects.get(id);
  return s ? s.display_name : "Subject #" + id;
}

function renderSubjectList() {
  const ul = clear($("subject-list"));
  const list = [...state.subjects.values()].sort((a, b) => a.display_name.localeCompare(b.display_name));
  if (!list.length) ul.append(h("li", { class: "muted" }, "No subjects in your caseload."));
  for (const s of list) {
    ul.append(h("li", {
      class: state.detail && state.detail.subject.id === s.id ? "selected" : "",
      "data-subject": s.id,
      onclick: () => openSubject(s.id),
    },
    h("span", {}, s.display_name, h("br"), h("small", { class: "muted" }, s.reference)),
    s.open_alerts ? h("span", { class: "badge", title: "open alerts" }, s.open_alerts) : ""));
  }
}

function dl(el, rows) {
  clear(el);
  for (const [k, v] of rows) {
    el.append(h("dt", {}, k), v instanceof Node ? h("dd", {}, v) : h("dd", {}, v === null || v === undefined || v === "" ? "—" : v));
  }
}

function yesNo(v, good, bad) {
  if (v === null || v === undefined) return h("span", { class: "muted" }, "unknown");
  return v ? h("span", { class: "ok" }, good) : h("span", { class: "bad" }, bad);
}

function scheduleText(z) {
  if (!z.schedule) return "Always active";
  const parts = (z.schedule.windows || []).map((w) => `${DAYS[w.day] || w.day} ${w.start}–${w.end}`);
  let s = parts.length ? parts.join(", ") : "No weekly windows";
  const ex = z.schedule.exceptions || [];
  if (ex.length) s += ` · ${ex.length} exception(s): ` + ex.map((x) => `${x.kind === "absence" ? "absence" : "extra curfew"} ${fmtTime(x.start)} – ${fmtTime(x.end)}${x.note ? " (" + x.note + ")" : ""}`).join("; ");
  return s;
}

async function openSubject(id) {
  switchTab("subjects");
  const r = await api("GET", "/api/subjects/" + id);
  if (!r.ok) { toast(errorText(r)); return; }
  state.detail = r.data;
  renderSubjectList();
  const d = r.data, s = d.subject, l = d.latest;
  $("subject-placeholder").classList.add("hidden");
  $("subject-detail").classList.remove("hidden");
  $("sd-title").textContent = s.display_name;
  $("sd-ref").textContent = s.reference;
  dl($("sd-info"), [
    ["Case reference", s.reference],
    ["Officer", d.officer ? d.officer.display_name : "unassigned"],
    ["Time zone", s.timezone],
    ["Order start", s.order_start ? fmtTime(s.order_start) : "—"],
    ["Order end", s.order_end ? fmtTime(s.order_end) : "open-ended"],
  ]);
  dl($("sd-device"), [
    ["Device", d.devices.map((a) => a.device_id).join(", ") || "none assigned"],
    ["Last contact", l ? `${fmtTime(l.last_contact)} (${ago(l.last_contact)})` : "—"],
    ["Battery", l && l.battery_pct !== null ? `${l.battery_pct}%${l.charging ? " (charging)" : ""}` : "—"],
    ["Strap", l ? yesNo(l.strap_ok, "intact", "TAMPER") : "—"],
    ["Case", l ? yesNo(l.case_ok, "intact", "TAMPER") : "—"],
    ["Home beacon", l ? yesNo(l.beacon_in_range, "in range", "out of range") : "—"],
    ["Last position", l && l.position ? `${l.position.lat.toFixed(5)}, ${l.position.lon.toFixed(5)} at ${fmtTime(l.position_time)}` : "—"],
  ]);
  const zones = clear($("sd-zones"));
  if (!d.zones.length) zones.append(h("p", { class: "muted" }, "No zones on this order."));
  for (const z of d.zones) {
    zones.append(h("div", { class: "zone-card " + z.kind },
      h("strong", {}, z.name), " ",
      h("span", { class: "muted" }, `${z.kind}${z.is_curfew_home ? " · curfew home" : ""} · ${z.geometry.type}`),
      h("div", { class: "sched" }, scheduleText(z))));
  }
  const ul = clear($("sd-alerts"));
  if (!d.alerts.length) ul.append(h("li", { class: "muted" }, "No alerts."));
  for (const a of d.alerts.slice(0, 20)) ul.append(alertItem(a, true));
  // Playback defaults: the last 24 hours.
  const now = new Date();
  $("pb-to").value = toLocalInput(now);
  $("pb-from").value = toLocalInput(new Date(now.getTime() - 24 * 3600 * 1000));
  state.trail = [];
  stopPlayback();
  $("pb-slider").disabled = true;
  $("pb-play").disabled = true;
  $("pb-status").textContent = "";
  drawTrailMap();
}

// ---------------------------------------------------------------- trail playback

async function loadTrail() {
  if (!state.detail) return;
  const id = state.detail.subject.id;
  const q = new URLSearchParams({ from: localInputToIso($("pb-from").value), to: localInputToIso($("pb-to").value) });
  const r = await api("GET", `/api/subjects/${id}/trail?${q}`);
  if (!r.ok) { $("pb-status").textContent = errorText(r); return; }
  state.trail = r.data.points;
  state.trailIndex = state.trail.length ? state.trail.length - 1 : 0;
  const slider = $("pb-slider");
  slider.max = Math.max(0, state.trail.length - 1);
  slider.value = state.trailIndex;
  slider.disabled = state.trail.length < 2;
  $("pb-play").disabled = state.trail.length < 2;
  stopPlayback();
  updatePlaybackStatus(r.data.truncated);
  drawTrailMap();
}

function updatePlaybackStatus(truncated) {
  const n = state.trail.length;
  if (!n) { $("pb-status").textContent = "No positions in this period."; return; }
  const p = state.trail[state.trailIndex];
  const speed = p.position.speed_kmh !== null && p.position.speed_kmh !== undefined ? ` · ${p.position.speed_kmh.toFixed(0)} km/h` : "";
  const batt = p.battery_pct !== null && p.battery_pct !== undefined ? ` · battery ${p.battery_pct}%` : "";
  $("pb-status").textContent = `Point ${state.trailIndex + 1} of ${n}: ${fmtTime(p.device_time)}${speed}${batt}` +
    (truncated ? " (trail truncated; choose a shorter period)" : "");
}

function stopPlayback() {
  if (state.playTimer) clearInterval(state.playTimer);
  state.playTimer = null;
  $("pb-play").textContent = "▶ Play";
}

function togglePlayback() {
  if (state.playTimer) { stopPlayback(); return; }
  if (state.trailIndex >= state.trail.length - 1) state.trailIndex = 0;
  $("pb-play").textContent = "❚❚ Pause";
  state.playTimer = setInterval(() => {
    if (state.trailIndex >= state.trail.length - 1) { stopPlayback(); return; }
    state.trailIndex += 1;
    $("pb-slider").value = state.trailIndex;
    updatePlaybackStatus(false);
    drawTrailMap();
  }, Number($("pb-speed").value) || 150);
}

function drawTrailMap() {
  const d = state.detail;
  if (!d) return;
  const positions = [];
  if (!state.trail.length && d.latest && d.latest.position) {
    positions.push({ lon: d.latest.position.lon, lat: d.latest.position.lat, label: d.subject.display_name });
  }
  drawMap($("trail-map"), { zones: d.zones, positions, trail: state.trail.map((p) => [p.position.lon, p.position.lat]), trailIndex: state.trailIndex });
}

// ---------------------------------------------------------------- map drawing (SVG, web mercator)

const R_EARTH = 6378137;

function mercX(lon) { return (lon + 180) / 360; }
function mercY(lat) {
  const s = Math.sin(Math.max(-85, Math.min(85, lat)) * Math.PI / 180);
  return 0.5 - Math.log((1 + s) / (1 - s)) / (4 * Math.PI);
}

function circlePoints(center, radius) {
  const pts = [];
  const [lon, lat] = center;
  for (let i = 0; i <= 64; i++) {
    const a = (i / 64) * 2 * Math.PI;
    const dLat = (radius * Math.cos(a)) / R_EARTH * 180 / Math.PI;
    const dLon = (radius * Math.sin(a)) / (R_EARTH * Math.cos(lat * Math.PI / 180)) * 180 / Math.PI;
    pts.push([lon + dLon, lat + dLat]);
  }
  return pts;
}

function zoneRings(z) {
  const g = z.geometry;
  if (g.type === "polygon") return g.rings;
  if (g.type === "multipolygon") return g.polygons.flat();
  if (g.type === "circle") return [circlePoints(g.center, g.radius_m)];
  return [];
}

function drawMap(svg, { zones = [], positions = [], trail = [], trailIndex = -1 }) {
  clear(svg);
  const vb = svg.viewBox.baseVal;
  const W = vb.width, H = vb.height, pad = 30;
  const pts = [];
  for (const z of zones) for (const r of zoneRings(z)) pts.push(...r);
  for (const p of positions) pts.push([p.lon, p.lat]);
  pts.push(...trail);
  if (!pts.length) {
    svg.append(h("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "Nothing to show yet: no zones or positions."));
    return;
  }
  let minX = Infinity, maxX = -Infinity, minY = Infinity, maxY = -Infinity;
  for (const [lon, lat] of pts) {
    const x = mercX(lon), y = mercY(lat);
    minX = Math.min(minX, x); maxX = Math.max(maxX, x);
    minY = Math.min(minY, y); maxY = Math.max(maxY, y);
  }
  // At least ~300 m across so a single point is not infinitely zoomed.
  const minSpan = 300 / (2 * Math.PI * R_EARTH);
  const spanX = Math.max(maxX - minX, minSpan), spanY = Math.max(maxY - minY, minSpan);
  const scale = Math.min((W - 2 * pad) / spanX, (H - 2 * pad) / spanY);
  const cx = (minX + maxX) / 2, cy = (minY + maxY) / 2;
  const px = (lon) => W / 2 + (mercX(lon) - cx) * scale;
  const py = (lat) => H / 2 + (mercY(lat) - cy) * scale;

  // Optional raster tiles under the vector drawing.
  if (state.tileUrl) {
    const z = Math.max(0, Math.min(19, Math.floor(Math.log2(scale / 256))));
    const n = 2 ** z, tileSize = scale / n;
    const x0 = Math.floor((cx - W / 2 / scale) * n), x1 = Math.floor((cx + W / 2 / scale) * n);
    const y0 = Math.floor((cy - H / 2 / scale) * n), y1 = Math.floor((cy + H / 2 / scale) * n);
    const g = h("g", { opacity: 0.85 });
    for (let tx = x0; tx <= x1 && tx - x0 < 12; tx++) for (let ty = y0; ty <= y1 && ty - y0 < 12; ty++) {
      if (ty < 0 || ty >= n) continue;
      const url = state.tileUrl.replace("{z}", z).replace("{x}", ((tx % n) + n) % n).replace("{y}", ty);
      g.append(h("image", { href: url, x: W / 2 + (tx / n - cx) * scale, y: H / 2 + (ty / n - cy) * scale, width: tileSize + 0.5, height: tileSize + 0.5 }));
    }
    svg.append(g);
  } else {
    // Light grid as a reference when there are no tiles.
    const g = h("g", { stroke: "#d5dde6", "stroke-width": 1 });
    for (let i = 1; i < 8; i++) g.append(h("line", { x1: (W * i) / 8, y1: 0, x2: (W * i) / 8, y2: H }));
    for (let i = 1; i < 5; i++) g.append(h("line", { x1: 0, y1: (H * i) / 5, x2: W, y2: (H * i) / 5 }));
    svg.append(g);
  }

  for (const z of zones) {
    const d = zoneRings(z).map((r) => "M" + r.map(([lon, lat]) => `${px(lon).toFixed(1)},${py(lat).toFixed(1)}`).join("L") + "Z").join(" ");
    const inc = z.kind === "inclusion";
    const colour = z.is_curfew_home ? "#1f5fbf" : inc ? "#2f8f4e" : "#b3122e";
    const path = h("path", {
      d, fill: colour, "fill-opacity": 0.18, stroke: colour, "stroke-width": 2,
      "fill-rule": "evenodd", "stroke-dasharray": z.is_curfew_home ? "6 4" : null,
    }, h("title", {}, `${z.name} (${z.kind}${z.is_curfew_home ? ", curfew home" : ""})`));
    svg.append(path);
    const r0 = zoneRings(z)[0];
    if (r0 && r0.length) {
      const lx = r0.reduce((s, p) => s + px(p[0]), 0) / r0.length;
      const ly = Math.min(...r0.map((p) => py(p[1]))) - 6;
      svg.append(h("text", { x: lx, y: ly, "text-anchor": "middle" }, z.name));
    }
  }

  if (trail.length) {
    svg.append(h("polyline", { points: trail.map(([lon, lat]) => `${px(lon).toFixed(1)},${py(lat).toFixed(1)}`).join(" "), fill: "none", stroke: "#8a94a3", "stroke-width": 2 }));
    const upto = trail.slice(0, Math.max(1, trailIndex + 1));
    svg.append(h("polyline", { points: upto.map(([lon, lat]) => `${px(lon).toFixed(1)},${py(lat).toFixed(1)}`).join(" "), fill: "none", stroke: "#1f5fbf", "stroke-width": 3 }));
    const cur = trail[Math.max(0, Math.min(trail.length - 1, trailIndex))];
    svg.append(h("circle", { cx: px(cur[0]), cy: py(cur[1]), r: 8, fill: "#e0571b", stroke: "#fff", "stroke-width": 3 }));
  }

  for (const p of positions) {
    svg.append(h("circle", { cx: px(p.lon), cy: py(p.lat), r: 7, fill: "#16335f", stroke: "#fff", "stroke-width": 2 },
      h("title", {}, p.label || "")));
    if (p.label) svg.append(h("text", { x: px(p.lon) + 10, y: py(p.lat) + 4 }, p.label));
  }

  // Scale bar.
  const latMid = Math.atan(Math.sinh(Math.PI * (1 - 2 * cy))) * 180 / Math.PI;
  const mpp = (2 * Math.PI * R_EARTH / scale) * Math.cos(latMid * Math.PI / 180);
  const nice = [10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000];
  const len = nice.find((m) => m / mpp > 80) || 100000;
  const bx = 14, by = H - 14, bw = len / mpp;
  svg.append(h("g", {}, h("line", { x1: bx, y1: by, x2: bx + bw, y2: by, stroke: "#1c2430", "stroke-width": 3 }),
    h("text", { x: bx, y: by - 6 }, len >= 1000 ? `${len / 1000} km` : `${len} m`)));
}

async function loadOverviewMap() {
  if (!state.me) return;
  const r = await api("GET", "/api/map");
  if (!r.ok) return;
  const positions = r.data.positions.filter((p) => p.latest && p.latest.position).map((p) => ({
    lon: p.latest.position.lon, lat: p.latest.position.lat, label: p.display_name,
  }));
  $("map-note").textContent = `${positions.length} of ${r.data.subjects.length} subjects with a position`;
  drawMap($("overview-map"), { zones: r.data.zones, positions });
}

// ---------------------------------------------------------------- alerts

// Triage order, the same as the server's: unresolved first; then escalated, most severe (an
// acknowledged critical stays above an open low battery), open before acknowledged, newest.
function sortAlerts(list) {
  const resolved = (x) => (x.state === "resolved" ? 1 : 0);
  return list.sort((a, b) =>
    (resolved(a) - resolved(b)) ||
    ((b.escalated ? 1 : 0) - (a.escalated ? 1 : 0)) ||
    (SEV_RANK[b.severity] - SEV_RANK[a.severity]) ||
    (STATE_RANK[a.state] - STATE_RANK[b.state]) ||
    (new Date(b.started_at) - new Date(a.started_at)) || (b.id - a.id));
}

async function loadAlerts() {
  const filter = $("alert-filter").value;
  const r = await api("GET", "/api/alerts?state=" + encodeURIComponent(filter));
  if (!r.ok) return;
  state.alerts = new Map(r.data.map((a) => [a.id, a]));
  renderAlerts();
}

function alertVisible(a) {
  const f = $("alert-filter").value;
  return f === "all" || f.split(",").includes(a.state);
}

function alertItem(a, compact) {
  const li = h("li", { class: `alert sev-${a.severity} state-${a.state}`, "data-alert-id": a.id, "data-state": a.state },
    h("div", { class: "bar" }),
    h("div", { class: "head" },
      h("span", { class: "sev " + a.severity }, a.severity),
      h("span", { class: "subject" }, subjectName(a.subject_id)),
      h("span", { class: "kind muted" }, KIND_WORDS[a.kind] || a.kind),
      h("span", { class: "state " + a.state }, a.state),
      a.escalated ? h("span", { class: "escalated-badge", title: "Not acknowledged in time: escalated to supervisors" }, "escalated") : ""),
    h("div", { class: "msg" }, a.message),
    h("div", { class: "meta" },
      `Started ${fmtTime(a.started_at)}`,
      a.state === "open" ? ` · waiting ${ago(a.created_at).replace(" ago", "")}` : "",
      a.acknowledged_at ? ` · acknowledged ${ago(a.acknowledged_at)}` : "",
      a.occurrences > 1 ? ` · ${a.occurrences} repeats, last ${ago(a.last_seen_at)}` : "",
      a.ended_at ? ` · condition ended ${fmtTime(a.ended_at)}` : "",
      a.resolution_code ? ` · resolved: ${a.resolution_code}${a.resolution_note ? " — " + a.resolution_note : ""}` : ""));
  if (!compact) {
    const buttons = h("div", { class: "buttons" });
    if (a.state === "open") buttons.append(h("button", { class: "primary ack", onclick: () => acknowledge(a.id) }, "Acknowledge"));
    if (a.state !== "resolved") {
      // A live condition cannot be resolved (the server refuses it: it would silence the
      // condition); say so instead of offering a button that fails.
      const live = !a.ended_at || new Date(a.ended_at) < new Date(a.last_seen_at);
      if (live) {
        buttons.append(h("span", { class: "muted live-note", title: "Resolving would silence a condition that is still going on. Acknowledge it; resolve it once the device shows the condition ended." },
          "Condition ongoing: resolve once it ends"));
      } else {
        buttons.append(h("button", { class: "resolve", onclick: () => openResolve(a.id) }, "Resolve"));
      }
    }
    buttons.append(h("button", { class: "link", onclick: () => openSubject(a.subject_id) }, "Subject"));
    li.append(buttons);
  }
  return li;
}

function renderAlerts(freshId) {
  const ul = clear($("alert-list"));
  const list = sortAlerts([...state.alerts.values()].filter(alertVisible));
  for (const a of list) {
    const li = alertItem(a, false);
    if (a.id === freshId) li.classList.add("fresh");
    ul.append(li);
  }
  $("alert-empty").classList.toggle("hidden", list.length > 0);
}

async function acknowledge(id) {
  const r = await api("POST", `/api/alerts/${id}/ack`);
  if (!r.ok) { toast(errorText(r)); return; }
  state.alerts.set(id, r.data);
  renderAlerts();
  toast("Alert acknowledged.");
}

function openResolve(id) {
  const a = state.alerts.get(id);
  state.resolving = id;
  const sel = clear($("rs-code"));
  sel.append(h("option", { value: "" }, "— choose a reason —"));
  for (const c of state.codes) sel.append(h("option", { value: c }, c.replace(/_/g, " ")));
  $("rs-note").value = "";
  $("rs-alert").textContent = a ? `${subjectName(a.subject_id)}: ${a.message}` : "";
  showFieldErrors($("resolve-form"), {});
  $("resolve-dialog").showModal();
}

async function submitResolve(ev) {
  ev.preventDefault();
  const id = state.resolving;
  const r = await api("POST", `/api/alerts/${id}/resolve`, { code: $("rs-code").value, note: $("rs-note").value });
  if (!r.ok) {
    showFieldErrors($("resolve-form"), r.data && r.data.errors ? r.data.errors : { _: errorText(r) });
    return;
  }
  $("resolve-dialog").close();
  state.alerts.set(id, r.data);
  renderAlerts();
  toast("Alert resolved.");
}

// Live feed: server-sent events, already filtered to this user's caseload by the server.
function startFeed() {
  stopFeed();
  const es = new EventSource("/api/alerts/stream");
  state.feed = es;
  es.addEventListener("ready", () => { $("live").textContent = "live"; $("live").className = "live on"; });
  es.addEventListener("alert", (ev) => {
    let notice;
    try { notice = JSON.parse(ev.data); } catch (e) { return; }
    const a = notice.alert;
    const isNew = !state.alerts.has(a.id);
    state.alerts.set(a.id, a);
    renderAlerts(isNew ? a.id : undefined);
    if (isNew) {
      toast(`New ${a.severity} alert: ${subjectName(a.subject_id)} — ${KIND_WORDS[a.kind] || a.kind}`);
      if (!state.subjects.has(a.subject_id)) loadSubjects();
    }
  });
  es.addEventListener("lagged", () => loadAlerts());
  es.addEventListener("session_expired", () => { stopFeed(); showLogin("Your session has ended. Please sign in again."); });
  es.onerror = () => {
    $("live").textContent = "reconnecting"; $("live").className = "live off";
    if (es.readyState === EventSource.CLOSED) setTimeout(() => { if (state.me) boot(); }, 3000);
  };
}

function stopFeed() {
  if (state.feed) state.feed.close();
  state.feed = null;
  const l = $("live");
  if (l) { l.textContent = "offline"; l.className = "live off"; }
}

// ---------------------------------------------------------------- zone editor

let zoneTabReady = false;
function initZoneTab() {
  const sel = $("zone-subject");
  const current = sel.value;
  clear(sel);
  for (const s of [...state.subjects.values()].sort((a, b) => a.display_name.localeCompare(b.display_name))) {
    sel.append(h("option", { value: s.id }, `${s.display_name} (${s.reference})`));
  }
  if (current && state.subjects.has(Number(current))) sel.value = current;
  else if (state.detail) sel.value = state.detail.subject.id;
  if (!zoneTabReady) { zoneTabReady = true; newZone(); }
  loadZoneList();
}

async function loadZoneList() {
  const id = $("zone-subject").value;
  const ul = clear($("zone-list"));
  if (!id) return;
  const r = await api("GET", `/api/subjects/${id}/zones`);
  if (!r.ok) { ul.append(h("li", { class: "error" }, errorText(r))); return; }
  state.zoneList = r.data;
  if (!r.data.length) ul.append(h("li", { class: "muted" }, "No zones yet."));
  for (const z of r.data) {
    ul.append(h("li", { class: state.editingZone && state.editingZone.id === z.id ? "selected" : "", onclick: () => editZone(z) },
      h("span", {}, z.name), h("small", { class: "muted" }, z.kind + (z.is_curfew_home ? " · home" : ""))));
  }
  drawMap($("zone-preview"), { zones: r.data });
}

function windowRow(w) {
  const i = $("zf-windows").children.length;
  const day = h("select", { class: "w-day", "data-field": `windows[${i}].day` }, ...[1, 2, 3, 4, 5, 6, 7].map((d) => h("option", { value: d }, DAYS[d])));
  day.value = String(w.day || 1);
  const tr = h("tr", {},
    h("td", {}, day, h("span", { class: "field-error", "data-error": `windows[${i}].day` })),
    h("td", {}, h("input", { class: "w-start", type: "time", value: w.start || "21:00", "data-field": `windows[${i}].start`, "aria-label": "start" }),
      h("span", { class: "field-error", "data-error": `windows[${i}].start` })),
    h("td", {}, "to"),
    h("td", {}, h("input", { class: "w-end", type: "time", value: w.end || "07:00", "data-field": `windows[${i}].end`, "aria-label": "end" }),
      h("span", { class: "field-error", "data-error": `windows[${i}].end` })),
    h("td", {}, h("button", { type: "button", class: "link", onclick: () => { tr.remove(); } }, "remove")));
  $("zf-windows").append(tr);
}

function exceptionRow(x) {
  const i = $("zf-exceptions").children.length;
  const kind = h("select", { class: "x-kind" }, h("option", { value: "absence" }, "approved absence"), h("option", { value: "extra_curfew" }, "extra curfew"));
  kind.value = x.kind || "absence";
  const tr = h("tr", {},
    h("td", {}, kind, h("span", { class: "field-error", "data-error": `exceptions[${i}].kind` })),
    h("td", {}, h("input", { class: "x-start", type: "datetime-local", value: x.start ? toLocalInput(new Date(x.start)) : "", "aria-label": "start" }),
      h("span", { class: "field-error", "data-error": `exceptions[${i}].start` })),
    h("td", {}, h("input", { class: "x-end", type: "datetime-local", value: x.end ? toLocalInput(new Date(x.end)) : "", "aria-label": "end" }),
      h("span", { class: "field-error", "data-error": `exceptions[${i}].end` })),
    h("td", {}, h("input", { class: "x-note", value: x.note || "", placeholder: "note", "aria-label": "note" }),
      h("span", { class: "field-error", "data-error": `exceptions[${i}].note` })),
    h("td", {}, h("button", { type: "button", class: "link", onclick: () => tr.remove() }, "remove")));
  $("zf-exceptions").append(tr);
}

function setShape(shape) {
  document.querySelectorAll('input[name="zf-shape"]').forEach((r) => { r.checked = r.value === shape; });
  $("zf-polygon").classList.toggle("hidden", shape !== "polygon");
  $("zf-circle").classList.toggle("hidden", shape !== "circle");
  $("zf-dynamic").classList.toggle("hidden", shape !== "dynamic");
}

function newZone() {
  state.editingZone = null;
  $("zone-form-title").textContent = "New zone";
  $("zf-name").value = "";
  $("zf-kind").value = "inclusion";
  $("zf-home").checked = false;
  $("zf-coords").value = "";
  $("zf-lon").value = ""; $("zf-lat").value = ""; $("zf-radius").value = "";
  $("zf-device").value = ""; $("zf-dradius").value = "";
  $("zf-dynamic-locked").classList.add("hidden");
  $("zf-save").disabled = false;
  clear($("zf-windows")); clear($("zf-exceptions"));
  setShape("polygon");
  $("zf-delete").classList.add("hidden");
  $("zf-status").textContent = "";
  showFieldErrors($("zone-form"), {});
  document.querySelectorAll("#zone-list li").forEach((li) => li.classList.remove("selected"));
}

function editZone(z) {
  newZone();
  state.editingZone = z;
  $("zone-form-title").textContent = "Edit zone: " + z.name;
  $("zf-name").value = z.name;
  $("zf-kind").value = z.kind;
  $("zf-home").checked = !!z.is_curfew_home;
  const g = z.geometry;
  if (g.type === "circle") {
    setShape("circle");
    $("zf-lon").value = g.center[0]; $("zf-lat").value = g.center[1]; $("zf-radius").value = g.radius_m;
  } else if (g.type === "dynamic") {
    // Victim protection: only a supervisor may change or remove it (the API enforces it too).
    setShape("dynamic");
    $("zf-device").value = g.device_id; $("zf-dradius").value = g.radius_m;
    const locked = state.me.role !== "supervisor";
    $("zf-dynamic-locked").classList.toggle("hidden", !locked);
    $("zf-save").disabled = locked;
  } else if (g.type === "polygon") {
    setShape("polygon");
    $("zf-coords").value = JSON.stringify(g.rings.length === 1 ? g.rings[0] : g.rings);
  }
  for (const w of (z.schedule && z.schedule.windows) || []) windowRow(w);
  for (const x of (z.schedule && z.schedule.exceptions) || []) exceptionRow(x);
  $("zf-delete").classList.toggle("hidden", $("zf-save").disabled);
  loadZoneList();
  drawMap($("zone-preview"), { zones: [z] });
}

function numOrNull(v) { const t = String(v).trim(); if (!t) return null; const n = Number(t); return isNaN(n) ? t : n; }

function zoneFormValue() {
  const shape = document.querySelector('input[name="zf-shape"]:checked').value;
  const body = {
    name: $("zf-name").value,
    kind: $("zf-kind").value,
    is_curfew_home: $("zf-home").checked,
    shape,
    windows: [...$("zf-windows").children].map((tr) => ({
      day: Number(tr.querySelector(".w-day").value),
      start: tr.querySelector(".w-start").value,
      end: tr.querySelector(".w-end").value,
    })),
    exceptions: [...$("zf-exceptions").children].map((tr) => ({
      kind: tr.querySelector(".x-kind").value,
      start: localInputToIso(tr.querySelector(".x-start").value),
      end: localInputToIso(tr.querySelector(".x-end").value),
      note: tr.querySelector(".x-note").value,
    })),
  };
  if (shape === "polygon") body.coordinates = $("zf-coords").value;
  else if (shape === "dynamic") {
    body.device_id = $("zf-device").value.trim();
    body.radius_m = numOrNull($("zf-dradius").value);
  } else {
    const lon = numOrNull($("zf-lon").value), lat = numOrNull($("zf-lat").value);
    body.center = lon === null || lat === null ? null : [lon, lat];
    body.radius_m = numOrNull($("zf-radius").value);
  }
  return body;
}

async function saveZone(ev) {
  ev.preventDefault();
  const subjectId = $("zone-subject").value;
  const body = zoneFormValue();
  const r = state.editingZone
    ? await api("PUT", `/api/zones/${state.editingZone.id}`, body)
    : await api("POST", `/api/subjects/${subjectId}/zones`, body);
  if (!r.ok) {
    showFieldErrors($("zone-form"), r.data && r.data.errors ? r.data.errors : { _: errorText(r) });
    $("zf-status").textContent = "Not saved — see the messages next to the fields.";
    return;
  }
  showFieldErrors($("zone-form"), {});
  $("zf-status").textContent = "Saved.";
  state.editingZone = r.data;
  $("zone-form-title").textContent = "Edit zone: " + r.data.name;
  $("zf-delete").classList.remove("hidden");
  await loadZoneList();
  drawMap($("zone-preview"), { zones: [r.data] });
}

async function deleteZone() {
  const z = state.editingZone;
  if (!z || !confirm(`Delete zone "${z.name}"? The subject's order changes immediately.`)) return;
  const r = await api("DELETE", `/api/zones/${z.id}`);
  if (!r.ok) { toast(errorText(r)); return; }
  newZone();
  loadZoneList();
  toast("Zone deleted.");
}

// ---------------------------------------------------------------- curfew report

function initReports() {
  if (!$("rp-from").value) {
    const to = new Date();
    const from = new Date(to.getTime() - 7 * 86400 * 1000);
    $("rp-to").value = to.toISOString().slice(0, 10);
    $("rp-from").value = from.toISOString().slice(0, 10);
  }
  updateCsvLink();
}

function reportQuery() {
  const to = new Date($("rp-to").value + "T00:00:00");
  to.setDate(to.getDate() + 1); // inclusive end date
  return new URLSearchParams({ from: new Date($("rp-from").value + "T00:00:00").toISOString(), to: to.toISOString() });
}

function updateCsvLink() {
  const q = reportQuery();
  q.set("format", "csv");
  $("rp-csv").href = "/api/reports/curfew?" + q;
}

async function runReport() {
  updateCsvLink();
  const err = document.querySelector("[data-error-report]");
  err.textContent = "";
  const r = await api("GET", "/api/reports/curfew?" + reportQuery());
  if (!r.ok) { err.textContent = errorText(r); return; }
  const rep = r.data;
  const tb = clear($("rp-subjects"));
  for (const s of rep.subjects) {
    tb.append(h("tr", {},
      h("td", {}, s.display_name, h("br"), h("small", { class: "muted" }, s.reference), s.error ? h("div", { class: "error" }, s.error) : ""),
      h("td", {}, s.officer_name || "—"),
      h("td", { class: "num" }, hours(s.required_secs)),
      h("td", { class: "num" }, hours(s.compliant_secs)),
      h("td", { class: "num" }, s.violation_count),
      h("td", { class: "num" }, hours(s.violation_secs)),
      h("td", { class: "num" }, s.compliance_pct === null ? "—" : s.compliance_pct + "%")));
  }
  const to = clear($("rp-officers"));
  for (const o of rep.officers) {
    to.append(h("tr", {}, h("td", {}, o.officer_name), h("td", { class: "num" }, o.subjects),
      h("td", { class: "num" }, hours(o.required_secs)), h("td", { class: "num" }, hours(o.compliant_secs)),
      h("td", { class: "num" }, o.violation_count), h("td", { class: "num" }, hours(o.violation_secs)),
      h("td", { class: "num" }, o.compliance_pct === null ? "—" : o.compliance_pct + "%")));
  }
  drawChart(rep.subjects);
}

function drawChart(rows) {
  const svg = clear($("rp-chart"));
  const rowH = 26, left = 190, right = 90, W = 800;
  const H = Math.max(60, rows.length * rowH + 40);
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const max = Math.max(1, ...rows.map((r) => r.required_secs));
  const bw = W - left - right;
  rows.forEach((r, i) => {
    const y = 10 + i * rowH;
    const req = (r.required_secs / max) * bw;
    const bad = (r.violation_secs / max) * bw;
    svg.append(h("text", { x: left - 8, y: y + 15, "text-anchor": "end" }, r.display_name));
    svg.append(h("rect", { x: left, y, width: Math.max(0, req), height: 18, fill: "#2f8f4e", rx: 3 },
      h("title", {}, `${hours(r.required_secs)} h required, ${hours(r.compliant_secs)} h compliant`)));
    if (bad > 0) svg.append(h("rect", { x: left + req - bad, y, width: bad, height: 18, fill: "#b3122e", rx: 3 },
      h("title", {}, `${hours(r.violation_secs)} h in violation (${r.violation_count} violations)`)));
    svg.append(h("text", { x: left + req + 6, y: y + 15 }, r.compliance_pct === null ? "no curfew" : r.compliance_pct + "%"));
  });
  const ly = H - 14;
  svg.append(h("rect", { x: left, y: ly - 10, width: 12, height: 12, fill: "#2f8f4e" }), h("text", { x: left + 16, y: ly }, "compliant hours"),
    h("rect", { x: left + 140, y: ly - 10, width: 12, height: 12, fill: "#b3122e" }), h("text", { x: left + 156, y: ly }, "hours in violation"));
}

// ---------------------------------------------------------------- audit

async function loadAudit() {
  const q = new URLSearchParams();
  if ($("au-actor").value.trim()) q.set("actor", $("au-actor").value.trim());
  if ($("au-subject").value.trim()) q.set("subject_id", $("au-subject").value.trim());
  if ($("au-target").value) q.set("target_type", $("au-target").value);
  if ($("au-action").value.trim()) q.set("action", $("au-action").value.trim());
  if ($("au-since").value) q.set("since", $("au-since").value);
  const err = document.querySelector("[data-error-audit]");
  err.textContent = "";
  const r = await api("GET", "/api/audit?" + q);
  const tb = clear($("au-rows"));
  if (!r.ok) { err.textContent = errorText(r); return; }
  for (const e of r.data) {
    tb.append(h("tr", { class: e.action === "access.denied" ? "denied" : "" },
      h("td", {}, fmtTime(e.at)), h("td", {}, e.actor),
      h("td", {}, e.action === "access.denied" ? h("strong", { class: "bad" }, e.action) : e.action),
      h("td", {}, e.target_type + (e.target_id ? " " + e.target_id : "")),
      h("td", {}, e.subject_id ? subjectName(e.subject_id) + " (#" + e.subject_id + ")" : ""),
      h("td", { class: "details" }, JSON.stringify(e.details).slice(0, 300))));
  }
}

// ---------------------------------------------------------------- administration

async function loadAdmin() {
  const users = await api("GET", "/api/users");
  const officers = users.ok ? users.data.filter((u) => u.role === "officer" && u.active) : [];
  const sel = clear($("sf-officer"));
  sel.append(h("option", { value: "" }, "— no officer —"));
  for (const o of officers) sel.append(h("option", { value: o.id }, o.display_name));
  await loadSubjects();
  const tb = clear($("adm-subjects"));
  for (const s of state.subjects.values()) {
    const pick = h("select", { "aria-label": "Officer for " + s.display_name }, h("option", { value: "" }, "— none —"),
      ...officers.map((o) => h("option", { value: o.id }, o.display_name)));
    pick.value = s.officer_id ? String(s.officer_id) : "";
    pick.addEventListener("change", async () => {
      const body = { reference: s.reference, display_name: s.display_name, timezone: s.timezone,
        officer_id: pick.value ? Number(pick.value) : null, order_start: s.order_start, order_end: s.order_end, rules: s.rules };
      const r = await api("PUT", "/api/subjects/" + s.id, body);
      toast(r.ok ? "Caseload updated." : errorText(r));
      loadSubjects();
    });
    tb.append(h("tr", {}, h("td", {}, s.reference), h("td", {}, s.display_name), h("td", {}, pick), h("td", {})));
  }
  if (state.me.role !== "admin") return;
  const ut = clear($("adm-users"));
  for (const u of users.ok ? users.data : []) {
    const box = h("input", { type: "checkbox", "aria-label": "active" });
    box.checked = u.active;
    box.addEventListener("change", async () => {
      const r = await api("PUT", "/api/users/" + u.id, { active: box.checked });
      if (!r.ok) { toast(errorText(r)); box.checked = !box.checked; }
    });
    ut.append(h("tr", {}, h("td", {}, u.username), h("td", {}, u.display_name), h("td", {}, u.role), h("td", {}, box)));
  }
  const devs = await api("GET", "/api/devices");
  const dt = clear($("adm-devices"));
  for (const d of devs.ok ? devs.data : []) {
    const pick = h("select", { "aria-label": "Subject for " + d.device_id }, h("option", { value: "" }, "— unassigned —"),
      ...[...state.subjects.values()].map((s) => h("option", { value: s.id }, s.display_name)));
    pick.value = d.subject_id ? String(d.subject_id) : "";
    pick.addEventListener("change", async () => {
      const r = pick.value
        ? await api("POST", `/api/devices/${encodeURIComponent(d.device_id)}/assign`, { subject_id: Number(pick.value) })
        : await api("POST", `/api/devices/${encodeURIComponent(d.device_id)}/unassign`);
      toast(r.ok ? "Assignment saved." : errorText(r));
    });
    dt.append(h("tr", {}, h("td", {}, d.device_id, d.active ? "" : " (inactive)"), h("td", {}, d.protocol), h("td", {}, pick), h("td", {}, d.has_secret ? "secret set" : "")));
  }
}

async function addSubject(ev) {
  ev.preventDefault();
  const err = document.querySelector("[data-error-subject]");
  const r = await api("POST", "/api/subjects", {
    reference: $("sf-ref").value, display_name: $("sf-name").value, timezone: $("sf-tz").value,
    officer_id: $("sf-officer").value ? Number($("sf-officer").value) : null,
  });
  err.textContent = r.ok ? "" : errorText(r);
  if (r.ok) { $("sf-ref").value = ""; $("sf-name").value = ""; loadAdmin(); }
}

async function addUser(ev) {
  ev.preventDefault();
  const err = document.querySelector("[data-error-user]");
  const r = await api("POST", "/api/users", {
    username: $("uf-username").value, display_name: $("uf-name").value, role: $("uf-role").value, password: $("uf-password").value,
  });
  err.textContent = r.ok ? "" : errorText(r);
  if (r.ok) { $("uf-username").value = ""; $("uf-name").value = ""; $("uf-password").value = ""; loadAdmin(); }
}

async function addDevice(ev) {
  ev.preventDefault();
  const err = document.querySelector("[data-error-device]");
  const r = await api("POST", "/api/devices", { device_id: $("df-id").value, protocol: $("df-proto").value, secret: $("df-secret").value || null });
  err.textContent = r.ok ? "" : errorText(r);
  const shown = $("df-generated");
  shown.textContent = "";
  if (r.ok && r.data && r.data.secret) {
    // Generated for a new osmand/em device: shown once, never retrievable again.
    shown.textContent = `Secret for ${r.data.device_id} (shown only now; give it to the device as its token / MQTT password): ${r.data.secret}`;
  }
  if (r.ok) { $("df-id").value = ""; $("df-secret").value = ""; loadAdmin(); }
}

// ---------------------------------------------------------------- wiring

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  document.querySelectorAll(".tab").forEach((b) => b.addEventListener("click", () => switchTab(b.dataset.tab)));
  $("alert-filter").addEventListener("change", loadAlerts);
  $("resolve-form").addEventListener("submit", submitResolve);
  $("rs-cancel").addEventListener("click", () => $("resolve-dialog").close());
  $("pb-load").addEventListener("click", loadTrail);
  $("pb-play").addEventListener("click", togglePlayback);
  $("pb-slider").addEventListener("input", () => {
    state.trailIndex = Number($("pb-slider").value);
    updatePlaybackStatus(false);
    drawTrailMap();
  });
  $("zone-subject").addEventListener("change", () => { newZone(); loadZoneList(); });
  $("zone-new").addEventListener("click", newZone);
  $("zone-form").addEventListener("submit", saveZone);
  $("zf-delete").addEventListener("click", deleteZone);
  $("zf-add-window").addEventListener("click", () => windowRow({}));
  $("zf-add-exception").addEventListener("click", () => exceptionRow({}));
  document.querySelectorAll('input[name="zf-shape"]').forEach((r) => r.addEventListener("change", () => setShape(r.value)));
  $("rp-run").addEventListener("click", runReport);
  $("rp-from").addEventListener("change", updateCsvLink);
  $("rp-to").addEventListener("change", updateCsvLink);
  $("au-run").addEventListener("click", loadAudit);
  $("subj-form").addEventListener("submit", addSubject);
  $("user-form").addEventListener("submit", addUser);
  $("dev-form").addEventListener("submit", addDevice);
  boot();
});
