"""Fixtures for ingest tests: the tiny tokenizer, builders for real PDF/DOCX files, a deadline."""

from __future__ import annotations

import signal
from contextlib import contextmanager

import pytest

from sovllm.models.tiny import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer()


def make_pdf(path, pages: list[list[tuple[str, int]]], *, header: str | None = "ACME Internal",
             footer: str | None = "Page {n}", encrypt: str | None = None):
    """A real PDF: each page a list of (text, font size) lines, with running header/footer."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    c = canvas.Canvas(str(path), pagesize=A4, invariant=1, encrypt=encrypt)
    for number, lines in enumerate(pages, start=1):
        if header:
            c.setFont("Helvetica", 8)
            c.drawString(50, 810, header)
        y = 770
        for text, size in lines:
            c.setFont("Helvetica-Bold" if size > 11 else "Helvetica", size)
            c.drawString(50, y, text)
            y -= size * 1.5 + (8 if size > 11 else 0)
        if footer:
            c.setFont("Helvetica", 8)
            c.drawString(280, 30, footer.format(n=number))
        c.showPage()
    c.save()
    return path


@contextmanager
def deadline(seconds: float):
    """Fail with TimeoutError (instead of hanging for minutes) when the body runs longer than `seconds`."""
    def expire(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
