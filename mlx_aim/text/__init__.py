"""Tokenizers: the CLIP BPE of the released LiT model, and the caption BPE a run trains."""
