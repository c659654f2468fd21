// AudioWorklet: forwards mono microphone samples to the page in ~20 ms batches.
class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.buffer = [];
    this.size = 0;
    this.batch = Math.round(sampleRate / 50);
  }
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) {
      this.buffer.push(new Float32Array(channel));
      this.size += channel.length;
      if (this.size >= this.batch) {
        const out = new Float32Array(this.size);
        let offset = 0;
        for (const b of this.buffer) { out.set(b, offset); offset += b.length; }
        this.port.postMessage(out, [out.buffer]);
        this.buffer = [];
        this.size = 0;
      }
    }
    return true;
  }
}
registerProcessor("capture-processor", CaptureProcessor);
