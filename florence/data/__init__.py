"""Florence's data: the built-in digits dataset (builtin), FLD-style curation into webdataset shards (curate), and
the DALI / PyTorch input pipeline (loader)."""
