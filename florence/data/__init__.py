"""Florence's data: the built-in datasets (builtin: digits, moving digits, digit canvases, digit questions),
FLD-style curation into webdataset shards (curate), the DALI / PyTorch input pipeline (loader), video clips (video),
object-detection data with COCO annotations (detection) and visual-question-answering data in VQA's format (vqa)."""
