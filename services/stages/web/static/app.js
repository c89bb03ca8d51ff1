// voicebus web page: one WebRTC call to the web stage, transcripts and state over a data channel.
// Plain JS, no build step. window.voicebus exposes state for people debugging (and for the tests).
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const STATS_INTERVAL_MS = 500;

const vb = (window.voicebus = { state: "idle", error: "", session: "", report: "", reportUrl: "", turns: {},
                                tools: {}, latencies: [], recordings: { played: [], mic: [] } });
let pc = null, channel = null, ctx = null, micStream = null, statsTimer = null, lastJitter = null;

function setStatus(state, text, kind = "") {
  vb.state = state;
  $("status").textContent = text;
  $("status").className = `status ${kind}`;
}

function fail(message) {
  vb.error = message;
  $("error").textContent = message;
  $("error").hidden = false;
  setStatus("error", "not connected", "error");
  console.error("voicebus:", message);
  cleanUp();
}

function turnElement(itemId, role) {
  let turn = vb.turns[itemId];
  if (!turn) {
    const element = document.createElement("div");
    element.className = `turn ${role}`;
    element.dataset.item = itemId;
    element.innerHTML = `<span class="who">${role === "user" ? "You" : "Assistant"}</span><span class="text"></span><span class="cut"></span><span class="meta"></span>`;
    $("transcript").appendChild(element);
    turn = vb.turns[itemId] = { role, text: "", element };
  }
  return turn;
}

function setText(turn, text) {
  turn.text = text;
  turn.element.querySelector(".text").textContent = text;
}

const handlers = {
  hello(m) {
    if (m.session !== vb.session) {  // a new conversation: nothing of the last one stays on the page
      vb.turns = {};
      vb.tools = {};
      vb.latencies = [];
      $("transcript").replaceChildren();
    }
    vb.session = m.session; $("session").textContent = m.session || "-"; handlers.report(m);
    if (!vb.reportUrl || !vb.reportUrl.includes(`/report/${m.session}?`)) showReportLink(m.report_url || "");
  },
  report(m) { vb.report = m.report || ""; $("report").textContent = m.report || "(no logger running)"; },
  tool_call(m) {  // as it happens: the name and arguments, then (tool_result) what it returned and how long it took
    const element = document.createElement("div");
    element.className = "turn tool pending";
    element.dataset.call = m.call_id;
    element.innerHTML = `<span class="who">Tool</span><span class="text"><code class="name"></code>(<code class="args"></code>)</span><span class="result"></span><span class="meta">running</span>`;
    element.querySelector(".name").textContent = m.name;
    element.querySelector(".args").textContent = m.arguments;
    $("transcript").appendChild(element);
    vb.tools[m.call_id] = { name: m.name, arguments: m.arguments, output: "", error: "", ms: null, element };
  },
  tool_result(m) {
    if (!vb.tools[m.call_id]) handlers.tool_call({ call_id: m.call_id, name: m.name, arguments: "" });
    const tool = vb.tools[m.call_id];
    Object.assign(tool, { output: m.output, error: m.error, ms: m.duration_ms });
    tool.element.classList.remove("pending");
    tool.element.classList.toggle("failed", !!m.error);
    tool.element.querySelector(".result").textContent = m.error ? `error: ${m.error}` : `→ ${m.output}`;
    tool.element.querySelector(".meta").textContent = m.duration_ms == null ? "" : `${Math.round(m.duration_ms)} ms`;
  },
  speech_started(m) { turnElement(m.item_id, "user"); setStatus("live", "hearing you", "live"); },
  speech_stopped() { setStatus("live", "thinking", "live"); },
  user_delta(m) { const t = turnElement(m.item_id, "user"); setText(t, t.text + m.text); },
  user_done(m) { setText(turnElement(m.item_id, "user"), m.text); },
  assistant_delta(m) { const t = turnElement(m.item_id, "assistant"); setText(t, t.text + m.text);
                       setStatus("live", "answering", "live"); },
  assistant_done(m) { setText(turnElement(m.item_id, "assistant"), m.text); setStatus("live", "connected", "live"); },
  truncated(m) {
    const turn = turnElement(m.item_id, "assistant");
    const heard = m.heard || "";
    const full = turn.text;
    turn.element.querySelector(".text").textContent = heard;
    turn.element.querySelector(".cut").textContent = full.startsWith(heard) ? full.slice(heard.length) : "";
    turn.element.querySelector(".meta").textContent = `(interrupted at ${(m.audio_end_ms / 1000).toFixed(2)} s)`;
    turn.truncatedAt = m.audio_end_ms;
  },
  turn(m) {
    vb.latencies.push(m.latency_ms);
    $("latency").textContent = `${m.latency_ms} ms`;
    const meta = turnElement(m.item_id, "assistant").element.querySelector(".meta");
    if (!meta.textContent) meta.textContent = `${m.latency_ms} ms`;
  },
  flush() { setStatus("live", "listening", "live"); },
  idle_prompt(m) { vb.idlePrompts = m.count; },
  ended(m) { vb.endedBy = m.reason; $("error").textContent = `The call ended: ${m.reason}.`; $("error").hidden = false; },
  error(m) { $("error").textContent = `server error: ${m.error}`; $("error").hidden = false; },
};

function showReportLink(url) {  // the caller's own report, written when the call ends
  vb.reportUrl = url;
  const link = $("report-link");
  link.hidden = !url;
  if (url) link.href = url;
}

async function connect() {
  $("error").hidden = true;
  vb.error = "";
  setStatus("connecting", "asking for the microphone");
  $("connect").disabled = true;
  try {
    micStream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 } });
  } catch (error) {
    const why = error.name === "NotAllowedError"
      ? "Microphone access was denied. Allow the microphone for this page (the icon in the address bar) and connect again."
      : error.name === "NotFoundError" ? "No microphone was found." : "The microphone could not be opened.";
    fail(`${why} (${error.name}: ${error.message})`);
    return;
  }
  setStatus("connecting", "connecting");
  try {
    ctx = new AudioContext({ latencyHint: "interactive" });
    await ctx.audioWorklet.addModule("/static/tap.js");
    const mic = ctx.createMediaStreamSource(micStream);
    const analyser = ctx.createAnalyser();
    analyser.fftSize = 1024;
    mic.connect(analyser);
    showLevel(analyser);
    if (params.has("record")) tap(mic, "mic", false);
    pc = new RTCPeerConnection();
    const micTrack = micStream.getAudioTracks()[0];
    pc.addTrack(micTrack, micStream);
    channel = pc.createDataChannel("events");
    channel.onmessage = (event) => {
      const message = JSON.parse(event.data);
      (handlers[message.type] || (() => {}))(message);
    };
    pc.ontrack = (event) => play(event.streams[0] || new MediaStream([event.track]));
    pc.onconnectionstatechange = () => {
      if (pc && pc.connectionState === "connected") setStatus("live", "connected", "live");
      if (pc && pc.connectionState === "failed") fail("The connection to the voicebus web stage failed.");
    };
    await pc.setLocalDescription(await pc.createOffer());
    await iceGathered(pc);
    const response = await fetch("/offer", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ type: "offer", sdp: pc.localDescription.sdp, mic: micTrack.getSettings() }) });
    const answer = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (!response.ok) { fail(answer.error || `HTTP ${response.status}`); return; }
    await pc.setRemoteDescription(answer);
    if (answer.report_url) showReportLink(answer.report_url);  // under serve: the front door's link
    if (answer.node_id) watchLine(answer.session);  // under voicebus serve: the front door knows if a node is lost
  } catch (error) {
    fail(`Could not connect: ${error.message || error}`);
    return;
  }
  $("mute").disabled = $("hangup").disabled = false;
  statsTimer = setInterval(sendStats, STATS_INTERVAL_MS);
}

function watchLine(session) {
  const timer = setInterval(async () => {
    if (!pc) { clearInterval(timer); return; }
    try {
      const state = await (await fetch(`/call/${encodeURIComponent(session)}`)).json();
      if (state.state === "dropped") { clearInterval(timer); fail(`The line dropped: ${state.reason}`); }
    } catch (error) { /* the front door busy or restarting: ask again */ }
  }, 1000);
}

function iceGathered(peer) {
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const check = () => { if (peer.iceGatheringState === "complete") resolve(); };
    peer.addEventListener("icegatheringstatechange", check);
    setTimeout(resolve, 2000);  // loopback candidates come at once; do not wait for unreachable STUN
  });
}

function play(stream) {
  // Chrome feeds a remote WebRTC stream into WebAudio only while a media element holds it
  const holder = new Audio();
  holder.muted = true;
  holder.srcObject = stream;
  holder.play().catch(() => {});
  const source = ctx.createMediaStreamSource(stream);
  tap(source, "played", true);
}

function tap(source, name, audible) {
  const node = new AudioWorkletNode(ctx, "tap");
  source.connect(node);
  if (audible) {
    node.connect(ctx.destination);
  } else {  // processed (so recorded) but not heard
    const mute = ctx.createGain();
    mute.gain.value = 0;
    node.connect(mute).connect(ctx.destination);
  }
  if (params.has("record")) {
    node.port.onmessage = (event) => vb.recordings[name].push(event.data);
    node.port.postMessage("record");
  }
}

function showLevel(analyser) {
  const samples = new Float32Array(analyser.fftSize);
  const draw = () => {
    if (!ctx) { $("level").style.width = "0"; return; }
    analyser.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const s of samples) sum += s * s;
    const dbfs = 10 * Math.log10(sum / samples.length + 1e-12);
    vb.levelDbfs = dbfs;
    $("level").style.width = `${Math.max(0, Math.min(100, (dbfs + 60) * 100 / 60))}%`;
    requestAnimationFrame(draw);
  };
  draw();
}

async function sendStats() {
  if (!pc || !channel || channel.readyState !== "open") return;
  const report = await pc.getStats();
  let jitterBufferMs = 0, rttMs = 0;
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio" && s.jitterBufferEmittedCount) {
      if (lastJitter && s.jitterBufferEmittedCount > lastJitter.count) {
        jitterBufferMs = 1000 * (s.jitterBufferDelay - lastJitter.delay) / (s.jitterBufferEmittedCount - lastJitter.count);
      } else {
        jitterBufferMs = 1000 * s.jitterBufferDelay / s.jitterBufferEmittedCount;
      }
      lastJitter = { delay: s.jitterBufferDelay, count: s.jitterBufferEmittedCount };
    }
    if (s.type === "candidate-pair" && s.nominated && s.currentRoundTripTime !== undefined) rttMs = 1000 * s.currentRoundTripTime;
  });
  const outputLatencyMs = 1000 * ((ctx.baseLatency || 0) + (ctx.outputLatency || 0));
  vb.stats = { jitter_buffer_ms: jitterBufferMs, output_latency_ms: outputLatencyMs, rtt_ms: rttMs };
  channel.send(JSON.stringify({ type: "stats", ...vb.stats }));
}

function toggleMute() {
  const track = micStream && micStream.getAudioTracks()[0];
  if (!track) return;
  track.enabled = !track.enabled;
  $("mute").textContent = track.enabled ? "Mute" : "Unmute";
  setStatus("live", track.enabled ? "connected" : "muted", "live");
}

function hangUp() {
  if (channel && channel.readyState === "open") channel.send(JSON.stringify({ type: "hangup" }));
  cleanUp();
  setStatus("idle", "hung up");
}

function cleanUp() {
  clearInterval(statsTimer);
  if (pc) pc.close();
  if (micStream) micStream.getTracks().forEach((t) => t.stop());
  if (ctx) ctx.close();
  pc = channel = micStream = ctx = null;
  lastJitter = null;
  $("connect").disabled = false;
  $("mute").disabled = $("hangup").disabled = true;
  $("mute").textContent = "Mute";
}

// What the page played (or heard from its mic) as 16-bit PCM in base64, with the wall-clock time
// (ms since the epoch) at which its first sample reached the speaker (played) or the page (mic).
vb.recording = (name) => {
  const chunks = vb.recordings[name];
  if (!chunks.length || !ctx) return null;
  const first = chunks[0].end - chunks[0].samples.length;
  const total = chunks[chunks.length - 1].end - first;
  const pcm = new Int16Array(total);
  for (const c of chunks) {
    const at = c.end - c.samples.length - first;
    for (let i = 0; i < c.samples.length; i++) pcm[at + i] = Math.max(-1, Math.min(1, c.samples[i])) * 32767;
  }
  const stamp = ctx.getOutputTimestamp();
  const outputToProcessingMs = name === "mic" ? 1000 * ((ctx.baseLatency || 0) + (ctx.outputLatency || 0)) : 0;
  const t0 = performance.timeOrigin + stamp.performanceTime + (first / ctx.sampleRate - stamp.contextTime) * 1000
             - outputToProcessingMs;
  let binary = "";
  const bytes = new Uint8Array(pcm.buffer);
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return { rate: ctx.sampleRate, t0_ms: t0, pcm: btoa(binary) };
};
vb.connect = connect;
vb.hangUp = hangUp;

$("connect").onclick = connect;
$("mute").onclick = toggleMute;
$("hangup").onclick = hangUp;
if (params.has("autoconnect")) connect();
