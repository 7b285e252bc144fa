"""Ingestion: documents (Markdown, text, HTML, PDF, DOCX) → structure-aware sections → token-sized chunks."""
