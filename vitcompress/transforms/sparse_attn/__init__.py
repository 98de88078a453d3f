"""Sparse attention (Sparsifiner-style, training-free): ``ops`` the pure block scoring, ``transform`` the glue."""
