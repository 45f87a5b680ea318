// Where audio comes from: the microphone (through the capture worklet) or a file decoded by the
// browser and played out at real time. Both hand 100 ms pcm_s16le frames to `onFrame`.
import { downmix, FRAME_MS, FRAME_SAMPLES, floatToS16, TARGET_RATE } from "./pcm.js";

const MICROPHONE = {
  channelCount: 1,
  // Speech recognition wants the raw signal: browser voice processing distorts it.
  echoCancellation: false,
  noiseSuppression: false,
  autoGainControl: false,
};

/**
 * Start capturing; resolves to a function that stops it. Call it from the click handler: the
 * AudioContext is created before the first await, while the click still counts as a gesture.
 */
export async function startMicrophone(onFrame) {
  const context = new AudioContext();
  try {
    if (!navigator.mediaDevices) {
      throw new Error("the microphone needs a secure page (https or localhost)");
    }
    const stream = await navigator.mediaDevices.getUserMedia({ audio: MICROPHONE });
    await context.audioWorklet.addModule(new URL("./worklet.js", import.meta.url));
    const source = context.createMediaStreamSource(stream);
    // No outputs: the node is pulled by the graph without being played back.
    const node = new AudioWorkletNode(context, "pcm-capture", { numberOfOutputs: 0 });
    node.port.onmessage = (event) => onFrame(event.data);
    source.connect(node);
    await context.resume();
    return () => {
      node.port.onmessage = null;
      source.disconnect();
      for (const track of stream.getTracks()) track.stop();
      context.close();
    };
  } catch (err) {
    context.close();
    throw err;
  }
}

/** Decode any format the browser knows, resampled to 16 kHz by an OfflineAudioContext. */
export async function decodeFile(file) {
  const context = new OfflineAudioContext(1, 1, TARGET_RATE);
  const buffer = await context.decodeAudioData(await file.arrayBuffer());
  const channels = [];
  for (let i = 0; i < buffer.numberOfChannels; i++) channels.push(buffer.getChannelData(i));
  return downmix(channels);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Send 16 kHz samples as 100 ms frames on a real-time schedule (no drift) until aborted. */
export async function playAtRealTime(samples, onFrame, signal) {
  const start = performance.now();
  for (let n = 0; n * FRAME_SAMPLES < samples.length; n++) {
    const wait = start + n * FRAME_MS - performance.now();
    if (wait > 0) await sleep(wait);
    if (signal.aborted) return;
    onFrame(floatToS16(samples.subarray(n * FRAME_SAMPLES, (n + 1) * FRAME_SAMPLES)));
  }
}
