"""What a frozen model is used for: features, embeddings, zero-shot, captions and probes."""
