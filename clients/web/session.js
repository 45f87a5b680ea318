// One stream to /v1/stream in the native protocol: open (API key in the query string, since a
// browser cannot set headers on a WebSocket), ask for server roll-up captions where the server
// offers them, send 100 ms pcm_s16le frames, close with a flush. Audio handed over before the
// server is ready waits in a queue, so the first words are not lost.
import { CAPTION_ROWS } from "./captions.js";
import { TARGET_RATE } from "./pcm.js";

/** The page's own origin with ws:// or wss:// (or a local server when opened from a file). */
export function defaultStreamUrl(location) {
  if (!location.host) return "ws://127.0.0.1:8765/v1/stream";
  const url = new URL("v1/stream", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.search = "";
  url.hash = "";
  return url.href;
}

export function streamUrl(base, apiKey) {
  const url = new URL(base);
  url.searchParams.set("encoding", "pcm_s16le");
  url.searchParams.set("sample_rate", String(TARGET_RATE));
  url.searchParams.set("channels", "1");
  if (apiKey) url.searchParams.set("api_key", apiKey);
  return url.href;
}

/** Why a handshake failed: the same URL over HTTP answers with the server's reason. */
async function handshakeFailure(url) {
  const probe = new URL(url);
  probe.protocol = probe.protocol === "wss:" ? "https:" : "http:";
  try {
    const response = await fetch(probe, { cache: "no-store" });
    if (response.status === 401 || response.status === 503 || response.status === 404) {
      return `server refused the stream: ${response.status} ${(await response.text()).trim()}`;
    }
  } catch {
    // another origin or no server: the generic reason below
  }
  return "could not connect (is the server running and the URL right?)";
}

export class StreamSession {
  /**
   * `onMessage(message)` gets every server message; `onEnd(reason)` once, when the stream is
   * over (reason null after a normal close).
   */
  constructor(url, { onMessage, onEnd }) {
    this.url = url;
    this.onMessage = onMessage;
    this.onEnd = onEnd;
    this.queue = [];
    this.ready = false;
    this.ended = false;
    this.closing = false; // close() was called: a connection given up is no failure
    this.sentMs = 0;
    this.timeline = []; // [audio ms at frame start, wall time the frame was handed over]
    this.serverCaptions = false;
    this.started = 0; // session.started messages seen
    this.error = null;
    this.socket = new WebSocket(url);
    this.socket.binaryType = "arraybuffer";
    this.socket.onmessage = (event) => this.receive(event.data);
    this.socket.onclose = (event) => this.closed(event);
  }

  /** Queue or send one frame of pcm_s16le bytes, stamped with the time it was handed over. */
  send(bytes) {
    this.timeline.push([this.sentMs, performance.now()]);
    this.sentMs += ((bytes.byteLength / 2) * 1000) / TARGET_RATE;
    if (this.ready) this.socket.send(bytes);
    else this.queue.push(bytes);
  }

  /** Wall time (performance.now) at which the frame holding the audio at `audioMs` was sent. */
  sentAt(audioMs) {
    let low = 0;
    let high = this.timeline.length - 1;
    if (high < 0) return undefined;
    while (low < high) {
      const middle = Math.ceil((low + high) / 2);
      if (this.timeline[middle][0] <= audioMs) low = middle;
      else high = middle - 1;
    }
    return this.timeline[low][1];
  }

  /** Flush: the server sends the last finals and session.closed, then closes. */
  close() {
    if (this.ended) return;
    this.closing = true;
    if (this.socket.readyState === WebSocket.OPEN && this.ready) {
      this.socket.send(JSON.stringify({ type: "close" }));
    } else {
      this.socket.close(1000);
    }
  }

  receive(data) {
    if (typeof data !== "string") return;
    const message = JSON.parse(data);
    if (message.type === "session.started") this.onStarted(message);
    if (message.type === "error") this.error = `${message.code}: ${message.message}`;
    this.onMessage(message);
  }

  onStarted(message) {
    this.started += 1;
    const config = message.config ?? {};
    if (this.started === 1 && "captions_mode" in config && config.captions_mode !== "rollup") {
      // The server knows roll-up captions: ask for them before any audio (session.start).
      const start = { type: "session.start", captions_mode: "rollup" };
      if ("captions_rows" in config) start.captions_rows = CAPTION_ROWS;
      this.socket.send(JSON.stringify(start));
      return;
    }
    this.serverCaptions = config.captions_mode === "rollup";
    this.ready = true;
    for (const bytes of this.queue) this.socket.send(bytes);
    this.queue = [];
  }

  async closed(event) {
    this.ready = false;
    if (this.ended) return;
    this.ended = true;
    let reason = null;
    if (event.code !== 1000 && !(this.closing && this.started === 0)) {
      const detail = event.reason ? ` ${event.reason}` : "";
      reason =
        this.error ??
        (this.started === 0
          ? await handshakeFailure(this.url)
          : `connection closed (${event.code}${detail})`);
    }
    this.onEnd(reason);
  }
}
