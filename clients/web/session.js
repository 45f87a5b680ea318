// One stream to /v1/stream in the native protocol: open (with an API key, the page first swaps
// it for a short-lived stream token on the server's REST port and offers the token as the
// subprotocol `token.<TOKEN>`, since a browser cannot set headers on a WebSocket: no key in any
// URL), ask for server roll-up captions where the server offers them, send 100 ms pcm_s16le
// frames, close with a flush. Audio handed over before the server is ready (or while the token
// is fetched) waits in a queue, so the first words are not lost.
import { CAPTION_ROWS } from "./captions.js";
import { TARGET_RATE } from "./pcm.js";

// Session resume: after a dropped connection (close 1006, no close frame), reconnect after
// these delays (ms) with ?resume=TOKEN&last_seq=N, and send again the audio the server did not
// get; the last RESEND_MS of audio sent is kept for that.
const RECONNECT_DELAYS_MS = [200, 500, 1000, 2000, 4000];
const RESEND_MS = 60000;
const BYTES_PER_MS = (TARGET_RATE * 2) / 1000;

/** The page's own origin with ws:// or wss:// (or a local server when opened from a file). */
export function defaultStreamUrl(location) {
  if (!location.host) return "ws://127.0.0.1:8765/v1/stream";
  const url = new URL("v1/stream", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.search = "";
  url.hash = "";
  return url.href;
}

export function streamUrl(base) {
  const url = new URL(base);
  url.searchParams.set("encoding", "pcm_s16le");
  url.searchParams.set("sample_rate", String(TARGET_RATE));
  url.searchParams.set("channels", "1");
  return url.href;
}

/** `path` on the server of a WebSocket URL, over HTTP(S): ws: to http:, wss: to https:. */
function httpUrl(url, path) {
  const http = new URL(path, url);
  http.protocol = http.protocol === "wss:" ? "https:" : "http:";
  return http;
}

/**
 * The subprotocols to open a stream with: none without an API key; with one, `token.<TOKEN>`
 * for a stream-only token minted by POST /v1/auth/token on the REST port (which the main port's
 * open GET /v1/client-config names), or the key itself as `token, KEY` where the server has no
 * REST port. Throws with the server's reason when it refuses the key.
 */
export async function streamProtocols(base, apiKey) {
  if (!apiKey) return [];
  let config = null;
  try {
    const response = await fetch(httpUrl(base, "/v1/client-config"), { cache: "no-store" });
    if (response.ok) config = await response.json();
  } catch {
    // a server without the endpoint: the key itself, as subprotocols
  }
  if (!config?.rest_port) return ["token", apiKey];
  const url = httpUrl(base, "/v1/auth/token");
  url.port = String(config.rest_port);
  let response;
  try {
    response = await fetch(url, {
      method: "POST",
      cache: "no-store",
      headers: { Authorization: `Bearer ${apiKey}`, "Content-Type": "application/json" },
      body: JSON.stringify({ scopes: ["stream"] }),
    });
  } catch {
    throw new Error(`could not reach the server's token endpoint at ${url.origin}`);
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const why = body?.error?.message ?? response.statusText;
    throw new Error(`could not get a token: ${response.status} ${why}`);
  }
  return [`token.${body.token}`];
}

/** The credential of `protocols` as a header, for a plain HTTP request to the server. */
function authorization(protocols) {
  if (protocols.length === 1) return { Authorization: `Bearer ${protocols[0].slice(6)}` };
  if (protocols.length === 2) return { Authorization: `Bearer ${protocols[1]}` };
  return {};
}

/** Why a handshake failed: the same URL over HTTP, with the same credential, says why. */
async function handshakeFailure(url, protocols) {
  const probe = httpUrl(url, url);
  try {
    const response = await fetch(probe, { cache: "no-store", headers: authorization(protocols) });
    if ([401, 404, 429, 503].includes(response.status)) {
      return `server refused the stream: ${response.status} ${(await response.text()).trim()}`;
    }
  } catch {
    // another origin or no server: the generic reason below
  }
  return "could not connect (is the server running and the URL right?)";
}

export class StreamSession {
  /**
   * `protocols`: the subprotocols (or a promise of them, see streamProtocols) to open with;
   * `onMessage(message)` gets every server message; `onEnd(reason)` once, when the stream is
   * over (reason null after a normal close).
   */
  constructor(url, { protocols = [], renewProtocols = null, onMessage, onEnd }) {
    this.url = url;
    // A resume may need a fresh credential (a token may have expired): `renewProtocols()`
    // gives one; without it the first one is offered again.
    this.renewProtocols = renewProtocols;
    this.resumeToken = null;
    this.lastSeq = 0;
    this.kept = []; // [stream byte offset, bytes] of the last RESEND_MS of audio sent
    this.keptBytes = 0;
    this.audioBytes = 0; // bytes handed over so far
    this.reconnects = 0; // tries since the link dropped
    this.resuming = false; // between a drop and session.resumed
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
    this.protocols = [];
    this.socket = null; // once the credential is known
    Promise.resolve(protocols).then(
      (list) => this.connect(list),
      (err) => this.end(err.message),
    );
  }

  connect(protocols, url = this.url) {
    if (this.ended) return;
    if (this.closing && !this.resuming) {
      this.end(null); // stopped before there was anything to close
      return;
    }
    this.protocols = protocols;
    this.socket = new WebSocket(url, protocols);
    this.socket.binaryType = "arraybuffer";
    this.socket.onmessage = (event) => this.receive(event.data);
    this.socket.onclose = (event) => this.closed(event);
  }

  /** Queue or send one frame of pcm_s16le bytes, stamped with the time it was handed over. */
  send(bytes) {
    this.timeline.push([this.sentMs, performance.now()]);
    this.sentMs += ((bytes.byteLength / 2) * 1000) / TARGET_RATE;
    this.keep(bytes);
    if (this.ready) this.socket.send(bytes);
    else if (!this.resuming) this.queue.push(bytes); // a resume resends it from `kept`
  }

  /** Remember a frame for resending after a drop (the last RESEND_MS of audio). */
  keep(bytes) {
    this.kept.push([this.audioBytes, bytes]);
    this.audioBytes += bytes.byteLength;
    this.keptBytes += bytes.byteLength;
    while (this.kept.length > 1 && this.keptBytes - this.kept[0][1].byteLength >= RESEND_MS * BYTES_PER_MS) {
      this.keptBytes -= this.kept.shift()[1].byteLength;
    }
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
    if (!this.socket) return; // connect() sees `closing`
    if (this.socket.readyState === WebSocket.OPEN && this.ready) {
      this.socket.send(JSON.stringify({ type: "close" }));
    } else if (!this.resuming) {
      this.socket.close(1000);
    } // else a resume is under way: onResumed sends the close after the audio
  }

  receive(data) {
    if (typeof data !== "string") return;
    const message = JSON.parse(data);
    if (typeof message.seq === "number") {
      if (message.seq <= this.lastSeq) return; // seen before the drop
      this.lastSeq = message.seq;
    }
    if (message.type === "session.started") this.onStarted(message);
    if (message.type === "session.resumed") this.onResumed(message);
    if (message.type === "error") this.error = `${message.code}: ${message.message}`;
    this.onMessage(message);
  }

  onStarted(message) {
    this.started += 1;
    this.resumeToken = message.resume_token ?? null;
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

  /** Back after a drop: send the audio the server did not get, then go on (or flush). */
  onResumed(message) {
    this.reconnects = 0;
    this.resuming = false;
    const from = message.audio_bytes;
    for (const [offset, bytes] of this.kept) {
      if (offset + bytes.byteLength > from) {
        this.socket.send(bytes.slice(Math.max(0, from - offset)));
      }
    }
    this.ready = true;
    if (this.closing) this.socket.send(JSON.stringify({ type: "close" }));
  }

  /** Reconnect and resume, after a delay; false when every try is spent. */
  resume() {
    if (!this.resumeToken || this.reconnects >= RECONNECT_DELAYS_MS.length) return false;
    const delay = RECONNECT_DELAYS_MS[this.reconnects];
    this.reconnects += 1;
    this.resuming = true;
    this.queue = []; // all of it is in `kept`
    const url = new URL(this.url);
    url.search = "";
    url.searchParams.set("resume", this.resumeToken);
    url.searchParams.set("last_seq", String(this.lastSeq));
    setTimeout(async () => {
      let protocols = this.protocols;
      if (this.renewProtocols) {
        try {
          protocols = await this.renewProtocols();
        } catch {
          // the token endpoint is out of reach too: the next try asks again
        }
      }
      this.connect(protocols, url.href);
    }, delay);
    return true;
  }

  async closed(event) {
    this.ready = false;
    if (this.ended) return;
    if (event.code === 1006 && this.started > 0 && this.resume()) return; // the network went
    let reason = null;
    if (event.code !== 1000 && !(this.closing && this.started === 0)) {
      const detail = event.reason ? ` ${event.reason}` : "";
      reason =
        this.error ??
        (this.started === 0
          ? await handshakeFailure(this.url, this.protocols)
          : `connection closed (${event.code}${detail})`);
    }
    this.end(reason);
  }

  end(reason) {
    this.ready = false;
    if (this.ended) return;
    this.ended = true;
    this.onEnd(reason);
  }
}
