"""Synthetic QA generation against any OpenAI-compatible endpoint: prompts, validation, resumable runs."""
