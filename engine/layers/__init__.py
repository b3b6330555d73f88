"""Building blocks: tensor-parallel linears and embeddings, RMSNorm, rotary embedding, paged attention, sampler."""
