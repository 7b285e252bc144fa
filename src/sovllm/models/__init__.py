"""Base models: the registry (bundled SmolLM2, local directories), tokenizer normalisation, chat
rendering shared by every stage, and tiny in-code models for tests."""
