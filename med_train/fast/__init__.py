"""Speed-only pieces of the decoder: attention routes measured faster on the CPU (`attention`) and the decoding
caches that use them or keep their tensors in place (`caches`). Each equals the plain decoder's arithmetic
(`med`, `cache.DecoderCache`); `med.py` imports nothing from here, so without it the captioner is the same,
slower."""
