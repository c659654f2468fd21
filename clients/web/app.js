// Browser client: microphone -> AudioWorklet (model sample rate) -> WebSocket
// (binary float32 frames) -> server; outputs drawn as a scrolling heatmap.
// ?model=NAME&autostart=1&seconds=N streams for N seconds, then sends end
// (used by the headless browser test).
// Models with a speech-probability output (ModelInfo.speech_segments, e.g.
// silero-vad) also get the live probability and the speech segments the
// server detects (speech_started / speech_stopped events).
// A server that drains hands the stream off (`moved`, with a resume token):
// the page reconnects to the same origin (a load balancer picks a live
// replica), resumes with the token and resends the audio from the frame the
// server had, dropping any output it already shows. Audio is kept until the
// outputs prove the server stepped it (see clients/resume.py for the rule).
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let ws = null, audio = null, stream = null, info = null, stopTimer = null;
let sent = 0, received = 0, column = 0, probX = 0, openSegment = null, segmentCount = 0;
const modelsByName = {};
// Stream migration state: `log` holds {start, data} audio chunks the server
// may lack; `taken` frames came from the microphone, `acked` surely reached
// the server; `moving` is the pending hand-off ({token, frames_received}).
let streamUrl = "", log = [], taken = 0, acked = 0, moving = null, moves = 0;
let resumeAttempt = 0, nextOffset = 0, ending = false, logLost = false;
const RETRYABLE = new Set(["UNAVAILABLE", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"]);
const MAX_RESUME_ATTEMPTS = 8;
// Longer tokens go in a first text message: proxies cap URLs near 8 KiB.
const MAX_QUERY_TOKEN_CHARS = 4096;
const MAX_LOG_SECONDS = 60;

function setCount(id, n) { const el = $(id); el.textContent = String(n); el.dataset.count = String(n); }
function setStatus(s) { $("status").textContent = s; document.body.dataset.status = s; }
function showError(msg) { $("error").textContent = msg; document.body.dataset.error = msg; }

async function loadModels() {
  const headers = $("token").value ? { Authorization: "Bearer " + $("token").value } : {};
  const resp = await fetch("/v1/models", { headers });
  if (!resp.ok) { showError("cannot list models: HTTP " + resp.status); return; }
  const { models } = await resp.json();
  const select = $("model");
  select.innerHTML = "";
  for (const m of models) {
    const opt = document.createElement("option");
    opt.value = m.name; opt.textContent = m.name; opt.disabled = !m.sample_rate;
    select.appendChild(opt);
    modelsByName[m.name] = m;
  }
  const wanted = params.get("model");
  if (wanted) select.value = wanted;
}

function drawFrames(frames, width) {
  // One column per output frame; rows are channels, colour is the value
  // normalised per frame (enough to see structure live).
  const canvas = $("heatmap"), ctx = canvas.getContext("2d");
  const n = frames.length / width;
  if (canvas.height !== width) { canvas.height = Math.max(1, Math.min(width, 256)); }
  const rows = canvas.height, img = ctx.createImageData(1, rows);
  for (let f = 0; f < n; f++) {
    let lo = Infinity, hi = -Infinity;
    for (let c = 0; c < width; c++) { const v = frames[f * width + c]; lo = Math.min(lo, v); hi = Math.max(hi, v); }
    for (let r = 0; r < rows; r++) {
      const c = Math.floor((r / rows) * width);
      const v = (frames[f * width + c] - lo) / (hi - lo || 1);
      const p = (rows - 1 - r) * 4;
      img.data[p] = 255 * Math.min(1, 2 * v); img.data[p + 1] = 255 * Math.max(0, 2 * v - 1);
      img.data[p + 2] = 80 * (1 - v); img.data[p + 3] = 255;
    }
    if (column >= canvas.width) {
      ctx.drawImage(canvas, -1, 0);
      column = canvas.width - 1;
    }
    ctx.putImageData(img, column++, 0);
  }
}

function drawProbabilities(frames, width) {
  // Channel 0 is the speech probability: a scrolling trace on [0, 1] with
  // the default threshold (0.5) as a dashed line.
  const canvas = $("prob"), ctx = canvas.getContext("2d"), h = canvas.height;
  for (let f = 0; f < frames.length / width; f++) {
    const p = frames[f * width];
    if (probX >= canvas.width) { ctx.drawImage(canvas, -2, 0); probX = canvas.width - 2; }
    ctx.fillStyle = "#0b0f19"; ctx.fillRect(probX, 0, 2, h);
    ctx.fillStyle = "#445"; ctx.fillRect(probX, h / 2, 2, 1);
    ctx.fillStyle = p >= 0.5 ? "#4caf50" : "#8899aa";
    const y = Math.round((1 - p) * (h - 1));
    ctx.fillRect(probX, y, 2, h - y);
    probX += 2;
    $("prob-now").textContent = p.toFixed(3);
  }
}

function onSpeech(msg, rate) {
  const seconds = (msg.sample / rate).toFixed(2);
  if (msg.type === "speech_started") {
    openSegment = document.createElement("li");
    openSegment.textContent = `${seconds} s - ...`;
    openSegment.dataset.start = String(msg.sample);
    $("segments").appendChild(openSegment);
    $("speaking").textContent = "yes";
    segmentCount += 1; setCount("segment-count", segmentCount);
  } else if (openSegment) {
    openSegment.textContent = openSegment.textContent.replace("...", `${seconds} s`);
    openSegment.dataset.end = String(msg.sample);
    openSegment = null;
    $("speaking").textContent = "no";
  }
}

async function connect() {
  showError(""); setStatus("connecting");
  sent = 0; received = 0; column = 0; setCount("sent", 0); setCount("frames", 0);
  log = []; taken = 0; acked = 0; moving = null; moves = 0; resumeAttempt = 0;
  nextOffset = 0; ending = false; logLost = false; setCount("moves", 0);
  const model = $("model").value;
  const token = $("token").value;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  streamUrl = `${scheme}://${location.host}/v1/models/${encodeURIComponent(model)}/stream?dtype=float32`;
  if (token) streamUrl += "&token=" + encodeURIComponent(token);  // browsers cannot set headers
  const vad = Boolean(modelsByName[model] && modelsByName[model].speech_segments);
  if (vad) streamUrl += "&speech_segments=1";
  $("vad").hidden = !vad;
  $("heatmap").hidden = vad;  // one channel: the probability trace says more
  probX = 0; openSegment = null; segmentCount = 0; $("segments").innerHTML = "";
  setCount("segment-count", 0);
  openSocket(null);
  $("connect").disabled = true; $("disconnect").disabled = false;
}

function openSocket(resume) {
  // A resume carries the token as base64url in the URL, or in a first text
  // message when it is long (both are part of the pinned protocol).
  let url = streamUrl, first = null;
  if (resume) {
    const b64url = resume.token.replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
    if (b64url.length <= MAX_QUERY_TOKEN_CHARS) url += "&resume_token=" + b64url;
    else { url += "&resume=1"; first = JSON.stringify({ type: "config", resume_token: resume.token }); }
  }
  const socket = new WebSocket(url);
  ws = socket;
  socket.binaryType = "arraybuffer";
  socket.onopen = () => { if (first) socket.send(first); };
  socket.onmessage = (event) => onMessage(socket, event);
  socket.onclose = (event) => onClose(socket, event);
}

async function onMessage(socket, event) {
  if (socket !== ws) return;  // a connection already left behind
  if (typeof event.data === "string") {
    const msg = JSON.parse(event.data);
    if (msg.type === "started" && moving) resumed(msg);
    else if (msg.type === "started") { info = msg; await startAudio(msg); }
    else if (msg.type === "moved") {
      // The server closes next; onClose reconnects with the token.
      moving = { token: msg.resume_token, frames_received: msg.frames_received };
      resumeAttempt = 0; setStatus("moving");
      socket.close(1000);
    }
    else if (msg.type === "ended") { setCount("server-frames", msg.frames_out); setStatus("ended"); }
    else if (msg.type === "error" && moving && RETRYABLE.has(msg.code)) { /* next attempt on close */ }
    else if (msg.type === "error") { moving = null; showError(`${msg.code}: ${msg.message}`); setStatus("error"); }
    else if (msg.type === "speech_started" || msg.type === "speech_stopped") onSpeech(msg, info.sample_rate);
    return;
  }
  let frames = new Float32Array(event.data);
  const width = info.output_shape.reduce((a, b) => a * b, 1);
  // Outputs carry no offset on this door: count them, and drop what a
  // resumed stream sends again (its `started` said where it continues).
  const n = frames.length / width, start = nextOffset;
  nextOffset += n;
  if (start + n <= received) return;
  if (start < received) frames = frames.subarray((received - start) * width);
  received = start + n;
  setCount("frames", received);
  acknowledge();
  if (info.speech_segments) drawProbabilities(frames, width);
  else drawFrames(frames, width);
}

function acknowledge() {
  // `received` outputs (+ the dropped output_latency) prove this many input
  // frames were stepped: the server will never ask for them again.
  const r = info.output_ratio;
  const proven = Math.floor(((received + info.output_latency) * r.denominator) / r.numerator);
  acked = Math.max(acked, Math.min(proven, taken));
  while (log.length && log[0].start + log[0].data.length <= acked) log.shift();
}

function resumed(msg) {
  const from = moving.frames_received;
  nextOffset = msg.output_offset !== undefined ? msg.output_offset : received;
  moving = null; moves += 1; setCount("moves", moves); setStatus("streaming");
  // Resend what the server had not received, then carry on live.
  for (const chunk of log) {
    const end = chunk.start + chunk.data.length;
    if (end > from) ws.send(chunk.data.subarray(Math.max(0, from - chunk.start)));
  }
  if (ending) { ws.send(JSON.stringify({ type: "end" })); setStatus("ending"); }
}

function onClose(socket, event) {
  if (socket !== ws) return;
  if (moving) {
    const from = moving.frames_received;
    const kept = log.length ? log[0].start : taken;
    if (logLost && from < kept) {
      moving = null; showError(`cannot resume: audio from frame ${from} is no longer kept`);
    } else if (resumeAttempt < MAX_RESUME_ATTEMPTS) {
      const delay = Math.min(1000, 50 * 2 ** resumeAttempt++);
      setTimeout(() => openSocket(moving), delay);
      return;
    } else {
      moving = null; showError("the stream moved but no server resumed it");
    }
  }
  stopAudio();
  if (event.code !== 1000 && !$("error").textContent) showError(`closed: ${event.code} ${event.reason}`);
  if ($("status").textContent !== "ended" && $("status").textContent !== "error") setStatus("closed");
  $("connect").disabled = false; $("disconnect").disabled = true;
}

async function startAudio(model) {
  $("info").textContent = `${model.name}: ${model.sample_rate} Hz in, output [${model.output_shape}] ` +
    `x ${model.output_ratio.numerator}/${model.output_ratio.denominator} per sample`;
  stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: false } });
  audio = new AudioContext({ sampleRate: model.sample_rate });
  await audio.audioWorklet.addModule("/web/capture-worklet.js");
  const source = audio.createMediaStreamSource(stream);
  const node = new AudioWorkletNode(audio, "capture-processor");
  node.port.onmessage = (event) => {
    if (ending) return;
    // Kept until acknowledged; while the stream moves it is only kept, and
    // sent when the stream resumes.
    const data = event.data;
    log.push({ start: taken, data });
    taken += data.length;
    if (taken - acked > MAX_LOG_SECONDS * model.sample_rate) {
      const dropped = log.shift(); logLost = true;
      acked = Math.max(acked, dropped.start + dropped.data.length);
    }
    if (!moving && ws && ws.readyState === WebSocket.OPEN) ws.send(data);
    sent = taken; setCount("sent", sent);
  };
  source.connect(node);
  setStatus("streaming");
  const seconds = parseFloat(params.get("seconds") || "0");
  if (seconds > 0) stopTimer = setTimeout(disconnect, seconds * 1000);
}

function stopAudio() {
  if (stopTimer) { clearTimeout(stopTimer); stopTimer = null; }
  if (stream) { stream.getTracks().forEach((t) => t.stop()); stream = null; }
  if (audio) { audio.close(); audio = null; }
}

function disconnect() {
  stopAudio();
  ending = true;
  if (moving) return;  // `end` follows the resend once the stream resumes
  if (ws && ws.readyState === WebSocket.OPEN) { ws.send(JSON.stringify({ type: "end" })); setStatus("ending"); }
}

$("connect").onclick = connect;
$("disconnect").onclick = disconnect;
$("token").value = params.get("token") || "";
loadModels().then(() => { if (params.get("autostart")) connect(); });
