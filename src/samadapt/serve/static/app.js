// samadapt serve: the page. Plain JS, no build step. State lives on the server; the page shows one slice.
"use strict";

const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token");
const S = {
  info: null, sess: null, axis: 0, index: 0, raw: null, h: 0, w: 0, c: 1, labels: null, prompts: [],
  win: [0, 1], mode: "point", object: 1, zoom: 1, pending: 0, drag: null, sliceToken: 0, lastTiming: null,
};
window.samadapt = S; // read by the browser tests

function setStatus(text) { $("status").textContent = text; }

async function api(path, body, method) {
  const headers = {};
  if (token) headers["X-Token"] = token;
  const options = { method: method || (body === undefined ? "GET" : "POST"), headers };
  if (body !== undefined) { headers["Content-Type"] = "application/json"; options.body = JSON.stringify(body); }
  S.pending++;
  try {
    const response = await fetch(path, options);
    if (!response.ok) {
      let detail = response.statusText;
      try { detail = (await response.json()).detail; } catch (e) { /* not JSON */ }
      const error = new Error(detail); error.status = response.status; throw error;
    }
    return response;
  } finally { S.pending--; }
}
const getJSON = async (path, body) => (await api(path, body)).json();

function fail(error) { setStatus("error: " + error.message); console.error(error); }

// ---- cases, models
async function loadInfo() {
  S.info = await getJSON("/api/info");
  const select = $("case");
  select.innerHTML = "";
  for (const c of S.info.cases) {
    const option = document.createElement("option");
    option.value = c.path; option.textContent = c.name; select.appendChild(option);
  }
  $("labels-dir").textContent = "relative paths go to " + S.info.labels_dir;
  fillModels();
}

function fillModels() {
  const select = $("model");
  select.innerHTML = "";
  for (const run of S.info.runs) {
    const option = document.createElement("option");
    option.value = run; option.textContent = run; option.selected = run === S.info.current;
    select.appendChild(option);
  }
  $("semantic").disabled = S.info.task !== "semantic";
  $("components").value = S.info.keep_components;
}

async function openCase(path) {
  setStatus("opening " + path);
  S.sess = await getJSON("/api/open", { path });
  S.axis = S.sess.axis;
  $("axis").value = String(S.axis);
  const win = $("window");
  win.innerHTML = "";
  const presets = { "model input": S.sess.window.default, ...S.sess.window.presets };
  for (const [name, range] of Object.entries(presets)) {
    const option = document.createElement("option");
    option.value = JSON.stringify(range); option.textContent = name; win.appendChild(option);
  }
  setWindow(S.sess.window.default);
  S.object = Number(Object.keys(S.sess.objects)[0] || 1);
  renderObjects();
  const stem = S.sess.name.replace(/\.(nii\.gz|nii|nrrd|nhdr|mha|mhd|png|jpe?g|npz|dcm)$/i, "");
  $("save-path").value = stem + (S.sess.name.toLowerCase().endsWith(".png") ? ".png" : ".nii.gz");
  $("save-format").hidden = !S.sess.dicom;  // DICOM cases: a DICOM SEG or an RT Structure Set too
  $("save-format").value = ".nii.gz";
  setAxis(S.axis, true);
  setStatus(S.sess.restored ? "restored autosave of " + new Date(S.sess.restored * 1000).toLocaleString() : "opened " + S.sess.name);
}

function renderObjects() {
  const list = $("objects");
  list.innerHTML = "";
  for (const [value, o] of Object.entries(S.sess.objects)) {
    const li = document.createElement("li");
    li.dataset.testid = "object-" + value;
    li.className = Number(value) === S.object ? "active" : "";
    li.innerHTML = `<span class="swatch" style="background:${o.color}"></span><span>${value}: </span>`;
    const name = document.createElement("span"); name.textContent = o.name; li.appendChild(name);
    li.onclick = () => { S.object = Number(value); renderObjects(); drawMarks(); };
    list.appendChild(li);
  }
}

// ---- view
function sliceCount() { return S.sess.shape[S.axis]; }

function setAxis(axis, middle) {
  S.axis = axis;
  const n = sliceCount();
  $("slice").max = String(n - 1);
  const index = middle || S.index >= n ? Math.floor(n / 2) : S.index;
  const [rows, cols] = [0, 1, 2].filter((k) => k !== axis).map((k) => S.sess.spacing[k]);
  S.aspect = rows / cols; // physical height of a pixel over its width
  S.flip = axis !== 0 && S.sess.z_up; // rows are z: draw the head upwards
  setSlice(index);
}

async function setSlice(index) {
  if (!S.sess) return;
  index = Math.max(0, Math.min(sliceCount() - 1, index));
  S.index = index;
  $("slice").value = String(index);
  $("slice-label").textContent = `${index + 1} / ${sliceCount()}`;
  const ticket = ++S.sliceToken;
  const q = `?axis=${S.axis}&index=${index}`;
  S.pending++; // until the slice is drawn, not only fetched
  try {
    const [pixels, labels] = await Promise.all([api(`/api/slice/${S.sess.session}${q}`), getJSON(`/api/labels/${S.sess.session}${q}`)]);
    const shape = pixels.headers.get("X-Shape").split(",").map(Number);
    const raw = new Float32Array(await pixels.arrayBuffer());
    if (ticket !== S.sliceToken) return; // a newer slice was asked for meanwhile
    [S.h, S.w, S.c] = shape;
    S.raw = raw;
    layout();
    drawImage();
    showLabels(labels);
  } finally { S.pending--; }
}

function layout() {
  const base = Math.min(($("stage").clientWidth - 20) / S.w, ($("stage").clientHeight - 20) / (S.h * S.aspect), 4);
  const scale = Math.max(base, 0.5) * S.zoom;
  const viewer = $("viewer");
  viewer.style.width = Math.round(S.w * scale) + "px";
  viewer.style.height = Math.round(S.h * S.aspect * scale) + "px";
  viewer.style.transform = S.flip ? "scaleY(-1)" : "";
  for (const id of ["image", "overlay"]) { $(id).width = S.w; $(id).height = S.h; }
  $("marks").width = S.w * 4; $("marks").height = S.h * 4;
  $("zoom-label").textContent = S.zoom + "x";
}

function setWindow(range) {
  S.win = [Number(range[0]), Number(range[1])];
  $("win-low").value = S.win[0].toPrecision(5); $("win-high").value = S.win[1].toPrecision(5);
  if (S.raw) drawImage();
}

function drawImage() {
  const context = $("image").getContext("2d");
  const picture = context.createImageData(S.w, S.h);
  const [low, high] = S.win;
  const scale = 255 / Math.max(high - low, 1e-6);
  const n = S.w * S.h;
  for (let i = 0; i < n; i++) {
    for (let k = 0; k < 3; k++) {
      const value = S.raw[i * S.c + (S.c === 1 ? 0 : k)];
      picture.data[i * 4 + k] = Math.max(0, Math.min(255, (value - low) * scale));
    }
    picture.data[i * 4 + 3] = 255;
  }
  context.putImageData(picture, 0, 0);
}

function decodeLabels(payload) {
  const bytes = Uint8Array.from(atob(payload.labels), (ch) => ch.charCodeAt(0));
  return new Uint16Array(bytes.buffer);
}

function showLabels(payload) {
  if (payload.axis !== S.axis || payload.index !== S.index) return;
  S.labels = decodeLabels(payload);
  S.prompts = payload.prompts || [];
  drawOverlay();
  drawMarks();
}

function hexColor(hex) { return [1, 3, 5].map((k) => parseInt(hex.slice(k, k + 2), 16)); }

function drawOverlay() {
  const context = $("overlay").getContext("2d");
  const picture = context.createImageData(S.w, S.h);
  if ($("show-labels").checked && S.labels) {
    const colors = {};
    for (const [value, o] of Object.entries(S.sess.objects)) colors[value] = hexColor(o.color);
    for (let i = 0; i < S.labels.length; i++) {
      const value = S.labels[i];
      if (!value) continue;
      const color = colors[value] || [255, 255, 0];
      picture.data.set([color[0], color[1], color[2], 255], i * 4);
    }
  }
  context.putImageData(picture, 0, 0);
}

function drawMarks() {
  const canvas = $("marks"), context = canvas.getContext("2d"), f = 4;
  context.clearRect(0, 0, canvas.width, canvas.height);
  for (const p of S.prompts) {
    const color = (S.sess.objects[p.object] || { color: "#ffff00" }).color;
    context.lineWidth = 2; context.strokeStyle = color;
    if (p.box) { const [x0, y0, x1, y1] = p.box; context.strokeRect(x0 * f, y0 * f, (x1 - x0 + 1) * f, (y1 - y0 + 1) * f); }
    for (const [x, y, label] of p.points) {
      context.beginPath(); context.ellipse((x + 0.5) * f, (y + 0.5) * f, 5, 5 / S.aspect, 0, 0, 2 * Math.PI);
      context.fillStyle = label ? "#00ff66" : "#ff3344"; context.fill(); context.strokeStyle = "#000"; context.stroke();
    }
  }
  if (S.drag && S.drag.to) {
    const [a, b] = [S.drag.from, S.drag.to];
    context.strokeStyle = "#ffff00"; context.setLineDash([6, 4]);
    context.strokeRect(Math.min(a[0], b[0]) * f, Math.min(a[1], b[1]) * f, (Math.abs(b[0] - a[0]) + 1) * f, (Math.abs(b[1] - a[1]) + 1) * f);
    context.setLineDash([]);
  }
}

// ---- prompts
function pixelAt(event) {
  const rect = $("viewer").getBoundingClientRect();
  const x = Math.floor(((event.clientX - rect.left) / rect.width) * S.w);
  let y = Math.floor(((event.clientY - rect.top) / rect.height) * S.h);
  if (S.flip) y = S.h - 1 - y; // the viewer is mirrored: screen top is the last row
  return [Math.max(0, Math.min(S.w - 1, x)), Math.max(0, Math.min(S.h - 1, y))];
}

async function sendPrompt(body) {
  const started = performance.now();
  setStatus("segmenting");
  try {
    const result = await getJSON("/api/prompt", { session: S.sess.session, axis: S.axis, index: S.index, object: S.object, ...body });
    const roundTrip = performance.now() - started;
    S.lastTiming = { server_ms: result.server_ms, round_trip_ms: roundTrip, encoded: result.encoded };
    showLabels(result);
    let encoded = result.encoded ? `, slice encoded in ${result.encode_ms.toFixed(0)} ms` : ", cached embedding";
    if (result.wait_ms > 50) encoded += `, ${result.wait_ms.toFixed(0)} ms behind a background encode`;
    const said = `mask: ${result.pixels} px in ${roundTrip.toFixed(0)} ms (server ${result.server_ms.toFixed(0)} ms${encoded})`;
    setStatus(said);
    if (result.neighbours && result.pixels > 0 && $("repropagate").checked) await carryCorrection(said);
  } catch (error) { fail(error); }
}

// a click on a slice whose neighbours hold the object: re-propagate from it until the change dies out
async function carryCorrection(said) {
  const started = performance.now();
  let job = await getJSON("/api/propagate", { session: S.sess.session, axis: S.axis, index: S.index, object: S.object, settle: true });
  job = await poll(job, "carrying the correction");
  if (job.state !== "done") { setStatus("re-propagation failed: " + job.message); return; }
  S.lastTiming = { ...S.lastTiming, carried_ms: performance.now() - started, carried: job.result.slices.length };
  setStatus(`${said}; carried to ${job.result.slices.length} slices in ${job.seconds.toFixed(1)} s`);
}

function setMode(mode) {
  S.mode = mode;
  $("mode-point").classList.toggle("active", mode === "point");
  $("mode-box").classList.toggle("active", mode === "box");
}

async function edit(path, extra) {
  try {
    const result = await getJSON(path, { session: S.sess.session, axis: S.axis, index: S.index, object: S.object, ...(extra || {}) });
    if (result.what === null) { setStatus("nothing to " + path.split("/").pop()); return result; }
    showLabels(result);
    setStatus(path.split("/").pop() + (result.what ? " " + result.what : "") + " done");
    return result;
  } catch (error) { fail(error); }
}

async function poll(job, label) {
  $("progress").max = Math.max(job.total, 1);
  let wait = 25; // short jobs (a carried correction) end within a few decoder calls: ask soon, then every 250 ms
  while (job.state === "running") {
    $("progress").value = job.done;
    setStatus(`${label} ${job.done}/${job.total} ${job.message || ""}`);
    await new Promise((resolve) => setTimeout(resolve, wait));
    wait = Math.min(wait * 2, 250);
    job = await getJSON(`/api/jobs/${job.id}`);
    $("progress").max = Math.max(job.total, 1);
  }
  $("progress").value = job.state === "done" ? $("progress").max : 0;
  return job;
}

async function propagate() {
  try {
    setStatus("propagating");
    let job = await getJSON("/api/propagate", { session: S.sess.session, axis: S.axis, index: S.index, object: S.object });
    job = await poll(job, "propagating");
    if (job.state !== "done") { setStatus("propagation failed: " + job.message); return; }
    await setSlice(S.index);
    const slices = job.result.slices;
    setStatus(`propagated to ${slices.length} slices` + (slices.length ? ` (${slices[0]}-${slices[slices.length - 1]})` : "") + ` in ${job.seconds.toFixed(1)} s`);
  } catch (error) { fail(error); }
}

async function complete() {
  try {
    setStatus("completing");
    let job = await getJSON("/api/complete", {
      session: S.sess.session, axis: S.axis, index: S.index,
      steps: Number($("complete-steps").value), overwrite: $("complete-overwrite").checked,
    });
    job = await poll(job, "completing");
    if (job.state !== "done") { setStatus("completion failed: " + job.message); return; }
    await setSlice(S.index);
    const r = job.result;
    setStatus(`completed: ${r.voxels} voxels on ${r.slices.length} slices from ${r.given.length} finished slices in ${job.seconds.toFixed(0)} s`);
  } catch (error) { fail(error); }
}

async function save(overwrite) {
  try {
    const result = await getJSON("/api/save", { session: S.sess.session, path: $("save-path").value || null, overwrite });
    setStatus("saved " + result.path);
  } catch (error) {
    if (error.status === 409 && !overwrite && confirm(error.message + "?")) return save(true);
    fail(error);
  }
}

async function adapt() {
  try {
    setStatus("adapt: building the training set");
    let job = await getJSON("/api/adapt", { session: S.sess.session, recipe: $("recipe").value, steps: Number($("adapt-steps").value) });
    job = await poll(job, "adapting");
    if (job.state !== "done") { setStatus("adapt failed: " + job.message); return; }
    S.info = { ...S.info, ...(await getJSON("/api/info")) };
    fillModels();
    setStatus(`adapted in ${job.seconds.toFixed(0)} s: now using ${S.info.current} (the base model is in the model list)`);
  } catch (error) { fail(error); }
}

// ---- events
function wire() {
  $("open").onclick = () => openCase($("case-path").value || $("case").value).catch(fail);
  $("axis").onchange = () => setAxis(Number($("axis").value), true);
  $("slice").oninput = () => setSlice(Number($("slice").value)).catch(fail);
  $("window").onchange = () => setWindow(JSON.parse($("window").value));
  $("win-low").onchange = $("win-high").onchange = () => setWindow([$("win-low").value, $("win-high").value]);
  $("zoom-in").onclick = () => { S.zoom = Math.min(S.zoom * 2, 16); layout(); drawImage(); drawOverlay(); drawMarks(); };
  $("zoom-out").onclick = () => { S.zoom = Math.max(S.zoom / 2, 0.25); layout(); drawImage(); drawOverlay(); drawMarks(); };
  $("show-labels").onchange = drawOverlay;
  $("mode-point").onclick = () => setMode("point");
  $("mode-box").onclick = () => setMode("box");
  $("undo").onclick = () => edit("/api/undo");
  $("redo").onclick = () => edit("/api/redo");
  $("erase").onclick = () => edit("/api/erase");
  $("semantic").onclick = async () => {
    try {
      const result = await getJSON("/api/semantic", { session: S.sess.session, axis: S.axis, index: S.index });
      S.sess = { ...S.sess, objects: result.objects }; renderObjects(); showLabels(result);
      setStatus(`auto: ${result.pixels} px in ${result.server_ms.toFixed(0)} ms`);
    } catch (error) { fail(error); }
  };
  $("add-object").onclick = async () => {
    try {
      const result = await getJSON("/api/objects", { session: S.sess.session, axis: S.axis, index: S.index, name: $("object-name").value || null });
      S.sess = { ...S.sess, objects: result.objects }; S.object = result.object; renderObjects();
      setStatus("object " + result.object + " added");
    } catch (error) { fail(error); }
  };
  $("propagate").onclick = propagate;
  $("complete").onclick = complete;
  $("components").onchange = async () => {
    try {
      const info = await getJSON("/api/components", { mode: $("components").value });
      setStatus("pieces: " + info.keep_components);
    } catch (error) { fail(error); }
  };
  $("save").onclick = () => save(false);
  $("save-format").onchange = () => {
    const path = $("save-path").value.replace(/(\.seg\.dcm|_rtstruct\.dcm|\.dcm|\.nii\.gz)$/i, "");
    $("save-path").value = path + $("save-format").value;
  };
  $("adapt").onclick = adapt;
  $("model").onchange = async () => {
    try {
      setStatus("loading model " + $("model").value);
      S.info = { ...S.info, ...(await getJSON("/api/model", { run: $("model").value })) };
      fillModels(); setStatus("model: " + S.info.model);
    } catch (error) { fail(error); }
  };

  const viewer = $("viewer");
  viewer.addEventListener("contextmenu", (event) => event.preventDefault());
  viewer.addEventListener("mousedown", (event) => {
    if (!S.sess) return;
    S.drag = { from: pixelAt(event), button: event.button, shift: event.shiftKey, to: null };
  });
  window.addEventListener("mousemove", (event) => {
    if (!S.drag || S.mode !== "box") return;
    S.drag.to = pixelAt(event); drawMarks();
  });
  window.addEventListener("mouseup", (event) => {
    if (!S.drag) return;
    const drag = S.drag; S.drag = null;
    const to = pixelAt(event);
    if (S.mode === "box") {
      drawMarks();
      if (Math.abs(to[0] - drag.from[0]) < 2 && Math.abs(to[1] - drag.from[1]) < 2) return;
      sendPrompt({ box: [drag.from[0], drag.from[1], to[0], to[1]] });
    } else {
      const positive = drag.button === 0 && !drag.shift && !event.altKey ? 1 : 0;
      sendPrompt({ point: [drag.from[0], drag.from[1], positive] });
    }
  });
  $("stage").addEventListener("wheel", (event) => {
    if (!S.sess) return;
    event.preventDefault();
    if (event.ctrlKey) { (event.deltaY < 0 ? $("zoom-in") : $("zoom-out")).click(); return; }
    setSlice(S.index + (event.deltaY > 0 ? 1 : -1)).catch(fail);
  }, { passive: false });
  window.addEventListener("keydown", (event) => {
    if (event.target.tagName === "INPUT" || !S.sess) return;
    if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z") { edit(event.shiftKey ? "/api/redo" : "/api/undo"); event.preventDefault(); }
    else if (event.key === "ArrowUp" || event.key === "ArrowRight") setSlice(S.index + 1);
    else if (event.key === "ArrowDown" || event.key === "ArrowLeft") setSlice(S.index - 1);
    else if (event.key === "b") setMode("box");
    else if (event.key === "p") setMode("point");
  });
  window.addEventListener("resize", () => { if (S.raw) { layout(); drawImage(); drawOverlay(); drawMarks(); } });
}

wire();
loadInfo().then(() => setStatus(`ready: ${S.info.model} (${S.info.task}); choose a case and open it`)).catch(fail);
