// AudioWorklet: passes audio through unchanged and, when asked, keeps a copy (mono, float) for the page.
class Tap extends AudioWorkletProcessor {
  constructor() {
    super();
    this.recording = false;
    this.chunk = new Float32Array(2048);
    this.filled = 0;
    this.port.onmessage = (event) => { this.recording = event.data === "record"; };
  }
  process(inputs, outputs) {
    const input = inputs[0];
    const output = outputs[0];
    for (let c = 0; c < output.length; c++) {
      if (input.length) output[c].set(input[Math.min(c, input.length - 1)]);
    }
    if (this.recording) {
      const block = input.length ? input[0] : new Float32Array(128);
      this.chunk.set(block, this.filled);
      this.filled += block.length;
      if (this.filled === this.chunk.length) {
        // currentFrame is the first frame of this block; the chunk ends with it
        this.port.postMessage({ end: currentFrame + block.length, samples: this.chunk });
        this.chunk = new Float32Array(2048);
        this.filled = 0;
      }
    }
    return true;
  }
}
registerProcessor("tap", Tap);
