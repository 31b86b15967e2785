"""The gravity model: its transformers config and modeling (self-contained, copied into every checkpoint),
loading and saving, the tokenizer, the bundled corpus and text → ids, the block-mask format, summaries."""
