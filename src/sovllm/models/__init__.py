"""Base models: the registry (bundled SmolLM2, local directories), tokenizer normalisation, chat
rendering and the training prompt format shared by every stage, and tiny in-code models for tests."""
