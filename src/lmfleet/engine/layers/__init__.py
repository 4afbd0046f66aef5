"""Building blocks of the decoder: attention over the paged KV cache, rotary
embeddings, norms, and the sampler."""
