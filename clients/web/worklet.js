// The microphone tap: runs on the audio thread, turns each 128-sample render quantum at the
// device rate into 16 kHz mono and posts 100 ms pcm_s16le frames (transferred, not copied) to
// the page.
import { Downsampler, downmix, FRAME_SAMPLES, floatToS16 } from "./pcm.js";

class PcmCapture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.downsampler = new Downsampler(sampleRate);
    this.frame = new Float32Array(FRAME_SAMPLES);
    this.filled = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (channels.length === 0) return true; // no input connected yet
    const samples = this.downsampler.process(downmix(channels));
    let offset = 0;
    while (offset < samples.length) {
      const take = Math.min(samples.length - offset, FRAME_SAMPLES - this.filled);
      this.frame.set(samples.subarray(offset, offset + take), this.filled);
      this.filled += take;
      offset += take;
      if (this.filled === FRAME_SAMPLES) {
        const bytes = floatToS16(this.frame);
        this.port.postMessage(bytes, [bytes]);
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor("pcm-capture", PcmCapture);
