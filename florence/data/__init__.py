"""Florence's data: the built-in datasets (builtin: digits, moving digits, digit canvases), FLD-style curation into
webdataset shards (curate), the DALI / PyTorch input pipeline (loader), video clips (video) and object-detection
data with COCO annotations (detection)."""
