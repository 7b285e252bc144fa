"""Curation: rule flags, deduplication, an LLM judge, leak-free grouped splits, negatives, distractors."""
