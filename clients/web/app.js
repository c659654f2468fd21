// Browser client: microphone -> AudioWorklet (model sample rate) -> WebSocket
// (binary float32 frames) -> server; outputs drawn as a scrolling heatmap.
// ?model=NAME&autostart=1&seconds=N streams for N seconds, then sends end
// (used by the headless browser test).
// Models with a speech-probability output (ModelInfo.speech_segments, e.g.
// silero-vad) also get the live probability and the speech segments the
// server detects (speech_started / speech_stopped events).
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let ws = null, audio = null, stream = null, info = null, stopTimer = null;
let sent = 0, received = 0, column = 0, probX = 0, openSegment = null, segmentCount = 0;
const modelsByName = {};

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
  const model = $("model").value;
  const token = $("token").value;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  let url = `${scheme}://${location.host}/v1/models/${encodeURIComponent(model)}/stream?dtype=float32`;
  if (token) url += "&token=" + encodeURIComponent(token);  // browsers cannot set headers
  const vad = Boolean(modelsByName[model] && modelsByName[model].speech_segments);
  if (vad) url += "&speech_segments=1";
  $("vad").hidden = !vad;
  $("heatmap").hidden = vad;  // one channel: the probability trace says more
  probX = 0; openSegment = null; segmentCount = 0; $("segments").innerHTML = "";
  setCount("segment-count", 0);
  ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  ws.onmessage = async (event) => {
    if (typeof event.data === "string") {
      const msg = JSON.parse(event.data);
      if (msg.type === "started") { info = msg; await startAudio(msg); }
      else if (msg.type === "ended") { setCount("server-frames", msg.frames_out); setStatus("ended"); }
      else if (msg.type === "error") { showError(`${msg.code}: ${msg.message}`); setStatus("error"); }
      else if (msg.type === "speech_started" || msg.type === "speech_stopped") onSpeech(msg, info.sample_rate);
      return;
    }
    const frames = new Float32Array(event.data);
    const width = info.output_shape.reduce((a, b) => a * b, 1);
    received += frames.length / width;
    setCount("frames", received);
    if (info.speech_segments) drawProbabilities(frames, width);
    else drawFrames(frames, width);
  };
  ws.onclose = (event) => {
    stopAudio();
    if (event.code !== 1000 && !$("error").textContent) showError(`closed: ${event.code} ${event.reason}`);
    if ($("status").textContent !== "ended" && $("status").textContent !== "error") setStatus("closed");
    $("connect").disabled = false; $("disconnect").disabled = true;
  };
  $("connect").disabled = true; $("disconnect").disabled = false;
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
    if (ws && ws.readyState === WebSocket.OPEN) {
      ws.send(event.data.buffer);
      sent += event.data.length; setCount("sent", sent);
    }
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
  if (ws && ws.readyState === WebSocket.OPEN) { ws.send(JSON.stringify({ type: "end" })); setStatus("ending"); }
}

$("connect").onclick = connect;
$("disconnect").onclick = disconnect;
$("token").value = params.get("token") || "";
loadModels().then(() => { if (params.get("autostart")) connect(); });
