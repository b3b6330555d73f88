"""The per-pod serving engine: continuous batching, paged KV cache, tensor parallelism, OpenAI API."""
