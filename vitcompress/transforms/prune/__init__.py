"""Structured pruning (heads, MLP), its importance scores, and block sparsity."""
