// The page: wires the controls to a stream session and renders what the server says —
// finals, the current partial (stable text plain, volatile tail styled apart), roll-up captions
// and the live figures.
import { CommittedWords, RollUp, segmentKey } from "./captions.js";
import { defaultStreamUrl, StreamSession, streamProtocols, streamUrl } from "./session.js";
import { decodeFile, playAtRealTime, startMicrophone } from "./sources.js";

const $ = (id) => document.getElementById(id);
const ui = {
  form: $("controls"),
  url: $("server-url"),
  key: $("api-key"),
  start: $("start"),
  stop: $("stop"),
  file: $("file"),
  drop: $("drop"),
  state: $("state"),
  finals: $("finals"),
  partials: $("partials"),
  captions: $("captions"),
  captionsSource: $("captions-source"),
  audioSent: $("audio-sent"),
  firstPartial: $("first-partial"),
  finalization: $("finalization"),
  finalizationDetail: $("finalization-detail"),
  lag: $("lag"),
};

let current = null; // the running stream (see open)
let lagQuiet = 0; // timer: the server reports lag only while behind, so silence means caught up
const LAG_QUIET_MS = 3000;

function setState(text, kind = "") {
  ui.state.textContent = text;
  ui.state.dataset.kind = kind;
}

function setBusy(busy) {
  ui.start.disabled = busy;
  ui.file.disabled = busy;
  ui.stop.disabled = !busy;
  ui.drop.classList.toggle("disabled", busy);
}

function clock(ms) {
  const s = Math.floor(ms / 1000);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function resetView() {
  ui.finals.replaceChildren();
  ui.partials.replaceChildren();
  for (const figure of [ui.audioSent, ui.firstPartial, ui.finalization, ui.lag]) {
    figure.textContent = "—";
  }
  ui.finalizationDetail.textContent = "";
  clearTimeout(lagQuiet);
}

/** A new stream (null, with the reason shown, when the URL is not one). */
function open(kind) {
  let url;
  try {
    url = streamUrl(ui.url.value.trim());
  } catch {
    setState(`not a server URL: ${ui.url.value}`, "error");
    return null;
  }
  resetView();
  const run = {
    kind,
    stopSource: () => {},
    failure: null,
    closing: false,
    over: false,
    captions: new RollUp(),
    committed: new CommittedWords(),
    firstPartialSeen: new Set(),
    partialViews: new Map(),
    serverCaptions: false,
  };
  renderCaptions(run, "built in the page");
  const key = ui.key.value.trim();
  run.session = new StreamSession(url, {
    protocols: streamProtocols(url, key), // a token for the key, if one is given
    renewProtocols: () => streamProtocols(url, key), // a fresh one to resume after a drop
    onMessage: (message) => show(run, message),
    onEnd: (reason) => finish(run, reason),
  });
  current = run;
  setBusy(true);
  setState(`connecting (${kind})…`);
  return run;
}

function send(run, bytes) {
  run.session.send(bytes);
  ui.audioSent.textContent = `${(run.session.sentMs / 1000).toFixed(1)} s`;
}

function stopSource(run) {
  const stop = run.stopSource;
  run.stopSource = () => {};
  stop();
}

/** Stop the source and flush: the server answers the last finals, then closes. */
function close(run) {
  if (run.over || run.closing) return;
  run.closing = true;
  stopSource(run);
  if (!run.failure) setState("closing: waiting for the last finals…");
  run.session.close();
}

function finish(run, reason) {
  run.over = true;
  stopSource(run);
  if (current === run) current = null;
  setBusy(false);
  const why = run.failure ?? reason;
  if (why) setState(why, "error");
  else if (ui.state.dataset.kind !== "closed") setState("stream closed", "closed");
}

async function startMicrophoneRun() {
  const run = open("microphone");
  if (!run) return;
  const capture = startMicrophone((bytes) => send(run, bytes)); // first: still in the click
  try {
    const stop = await capture;
    if (run.closing || run.over) stop();
    else run.stopSource = stop;
  } catch (err) {
    run.failure = `microphone unavailable: ${err.message}`;
    close(run);
  }
}

async function streamFile(file) {
  const run = open(`file ${file.name}`);
  if (!run) return;
  const abort = new AbortController();
  run.stopSource = () => abort.abort();
  try {
    const samples = await decodeFile(file);
    await playAtRealTime(samples, (bytes) => send(run, bytes), abort.signal);
    close(run);
  } catch (err) {
    run.failure = `cannot play ${file.name}: ${err.message}`;
    close(run);
  }
}

// --- server messages -----------------------------------------------------------------------

function show(run, message) {
  switch (message.type) {
    case "session.started":
      if (run.session.ready) {
        setState(`streaming (${run.kind})`, "streaming");
        run.serverCaptions = run.session.serverCaptions;
        if (run.serverCaptions) renderCaptions(run, "from the server");
      }
      break;
    case "transcript.partial":
      showPartial(run, message);
      break;
    case "transcript.final":
      showFinal(run, message);
      break;
    case "caption.append":
      if (!run.serverCaptions) {
        run.serverCaptions = true; // the server's captions replace the page's own
        run.captions.clear();
      }
      run.captions.append(message);
      renderCaptions(run, "from the server");
      break;
    case "status":
      ui.lag.textContent = `${message.lag_ms} ms behind, ${message.queued_audio_ms} ms queued`;
      clearTimeout(lagQuiet);
      lagQuiet = setTimeout(() => {
        ui.lag.textContent = "caught up";
      }, LAG_QUIET_MS);
      break;
    case "session.resumed":
      run.resumes = (run.resumes ?? 0) + 1;
      setState(
        `streaming (${run.kind}); resumed after ${(message.gap_ms / 1000).toFixed(1)} s offline`,
        "streaming",
      );
      break;
    case "error":
      setState(`server error ${message.code}: ${message.message}`, "error");
      break;
    case "session.closed":
      setState(
        `closed: ${(message.audio_ms / 1000).toFixed(1)} s of audio, ` +
          `${message.segments} segment${message.segments === 1 ? "" : "s"}`,
        "closed",
      );
      break;
  }
}

function showPartial(run, message) {
  const key = segmentKey(message);
  let view = run.partialViews.get(key);
  if (!view) {
    view = document.createElement("p");
    view.className = "partial";
    view.append(document.createElement("span"), " ", document.createElement("span"));
    view.firstChild.className = "stable";
    view.lastChild.className = "volatile";
    run.partialViews.set(key, view);
    ui.partials.append(view);
  }
  view.firstChild.textContent = message.stable_text;
  view.lastChild.textContent = message.volatile_text;
  if (!run.firstPartialSeen.has(key) && (message.stable_text || message.volatile_text)) {
    run.firstPartialSeen.add(key);
    const sent = run.session.sentAt(message.start_ms);
    if (sent !== undefined) {
      ui.firstPartial.textContent = `${Math.round(performance.now() - sent)} ms`;
    }
  }
  if (!run.serverCaptions) {
    run.captions.push(run.committed.partial(message));
    renderCaptions(run);
  }
  scrollTranscript();
}

function showFinal(run, message) {
  const key = segmentKey(message);
  run.partialViews.get(key)?.remove();
  run.partialViews.delete(key);
  if (message.text) {
    const line = document.createElement("p");
    line.className = "final";
    const time = document.createElement("span");
    time.className = "time";
    time.textContent = clock(message.start_ms);
    line.append(time, " ", message.text);
    ui.finals.append(line);
  }
  const { endpoint_ms: endpoint, queue_ms: queue, compute_ms: compute } = message.latency;
  ui.finalization.textContent = `${endpoint + queue + compute} ms`;
  ui.finalizationDetail.textContent = `endpoint ${endpoint} · queue ${queue} · compute ${compute}`;
  if (!run.serverCaptions) {
    run.captions.push(run.committed.final(message));
    renderCaptions(run);
  }
  scrollTranscript();
}

function renderCaptions(run, source) {
  ui.captions.textContent = run.captions.text();
  if (source) ui.captionsSource.textContent = `(${source})`;
}

function scrollTranscript() {
  const box = ui.finals.parentElement;
  box.scrollTop = box.scrollHeight;
}

// --- controls ------------------------------------------------------------------------------

ui.url.value = defaultStreamUrl(window.location);
ui.form.addEventListener("submit", (event) => event.preventDefault());
ui.start.addEventListener("click", startMicrophoneRun);
ui.stop.addEventListener("click", () => current && close(current));
ui.file.addEventListener("change", () => {
  const [file] = ui.file.files;
  ui.file.value = ""; // the same file can be chosen again
  if (file) streamFile(file);
});

// A file dropped anywhere must not replace the page; one dropped on the zone is streamed.
for (const type of ["dragover", "drop"]) {
  window.addEventListener(type, (event) => event.preventDefault());
}
ui.drop.addEventListener("dragover", () => ui.drop.classList.add("over"));
ui.drop.addEventListener("dragleave", () => ui.drop.classList.remove("over"));
ui.drop.addEventListener("drop", (event) => {
  ui.drop.classList.remove("over");
  const [file] = event.dataTransfer.files;
  if (file && !current) streamFile(file);
});

