"""LoRA fine-tuning: data encoding and the stop-token audit, presets, the trainer, tracking, the stop check."""
