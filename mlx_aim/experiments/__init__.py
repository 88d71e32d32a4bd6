"""Experiments built on the library: the AIMv1 paper's ablation study at laptop scale."""
