// Audio arithmetic shared by the microphone worklet and the file streamer: downmix, a low-pass
// downsampler to the server's 16 kHz, and float -> 16-bit PCM. No DOM, so it also runs in an
// AudioWorkletGlobalScope.

export const TARGET_RATE = 16000;
export const FRAME_MS = 100;
export const FRAME_SAMPLES = (TARGET_RATE * FRAME_MS) / 1000;

const TAPS = 95; // odd: a symmetric filter with a whole-sample delay

/** Average the channels of one block into a mono block. */
export function downmix(channels) {
  if (channels.length === 1) return channels[0];
  const mono = new Float32Array(channels[0].length);
  for (const channel of channels) {
    for (let i = 0; i < mono.length; i++) mono[i] += channel[i];
  }
  for (let i = 0; i < mono.length; i++) mono[i] /= channels.length;
  return mono;
}

/** Blackman-windowed sinc low-pass; `cutoff` in cycles per sample (0 .. 0.5), unity gain at DC. */
export function lowPassTaps(cutoff, count = TAPS) {
  const taps = new Float32Array(count);
  const middle = (count - 1) / 2;
  let sum = 0;
  for (let i = 0; i < count; i++) {
    const x = i - middle;
    const sinc = x === 0 ? 2 * cutoff : Math.sin(2 * Math.PI * cutoff * x) / (Math.PI * x);
    const phase = (2 * Math.PI * i) / (count - 1);
    const window = 0.42 - 0.5 * Math.cos(phase) + 0.08 * Math.cos(2 * phase);
    taps[i] = sinc * window;
    sum += taps[i];
  }
  for (let i = 0; i < count; i++) taps[i] /= sum;
  return taps;
}

/**
 * Streaming downsampler: low-pass below the output Nyquist (so nothing above 8 kHz folds back
 * into speech), then linear interpolation at the rate ratio (exact decimation for 48 kHz).
 * Blocks of any length go in; state carries over, so block boundaries leave no trace.
 */
export class Downsampler {
  constructor(inputRate, outputRate = TARGET_RATE) {
    if (inputRate < outputRate) {
      throw new RangeError(`input rate ${inputRate} Hz is below ${outputRate} Hz`);
    }
    this.step = inputRate / outputRate;
    this.taps =
      inputRate === outputRate ? Float32Array.of(1) : lowPassTaps((0.45 * outputRate) / inputRate);
    this.history = new Float32Array(this.taps.length - 1);
    this.position = 0; // next output, in filtered samples of the coming block (-1: last of previous)
    this.previous = 0; // last filtered sample of the previous block
  }

  process(input) {
    const n = input.length;
    const k = this.taps.length;
    const padded = new Float32Array(k - 1 + n);
    padded.set(this.history);
    padded.set(input, k - 1);
    this.history = padded.slice(n);
    const filtered = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      let acc = 0;
      for (let j = 0; j < k; j++) acc += this.taps[j] * padded[i + j];
      filtered[i] = acc;
    }
    const out = new Float32Array(Math.ceil(n / this.step) + 1);
    let count = 0;
    let t = this.position;
    while (t <= n - 1) {
      const i = Math.floor(t);
      const a = i < 0 ? this.previous : filtered[i];
      const b = i + 1 < n ? filtered[i + 1] : a;
      out[count++] = a + (t - i) * (b - a);
      t += this.step;
    }
    this.position = t - n;
    if (n > 0) this.previous = filtered[n - 1];
    return out.subarray(0, count);
  }
}

/** Float samples in [-1, 1] to signed 16-bit little-endian bytes (clipped): pcm_s16le. */
export function floatToS16(samples) {
  const bytes = new ArrayBuffer(samples.length * 2);
  const view = new DataView(bytes);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(i * 2, Math.round(s * 32767), true);
  }
  return bytes;
}
