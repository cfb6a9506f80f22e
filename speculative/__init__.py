"""The shared core of speculative decoding: targets, drafters, lossless verification, the decode loop."""
