"""Build the example corpus's PDF and DOCX documents from the Markdown sources in this folder.

Run from the repository root: `.venv/bin/python examples/acme/sources/build.py`. The outputs are
committed, so ingesting the example needs neither reportlab nor this script; it exists so the
binary documents can be regenerated and reviewed as text. The PDFs have a running header, a
page-number footer and headings set in larger type, as real exported policies do.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "documents"

PDFS = {
    "data-retention-policy.md": ("policies/data-retention-policy.pdf", "Page"),
    "reisekostenrichtlinie.md": ("hr/reisekostenrichtlinie.pdf", "Seite"),
    "backup-and-recovery-faq.md": ("engineering/backup-and-recovery-faq.pdf", "Page"),
}
DOCXS = {"onboarding-guide.md": "hr/onboarding-guide.docx"}


def blocks(text: str):
    """(kind, payload) for the Markdown subset the sources use: headings, lists, paragraphs."""
    paragraph: list[str] = []
    for line in text.splitlines() + [""]:
        heading = re.match(r"^(#{1,3})\s+(.*)$", line)
        item = re.match(r"^(- |\d+\. )(.*)$", line)
        if heading or item or not line.strip():
            if paragraph:
                yield "p", " ".join(paragraph)
                paragraph = []
        if heading:
            yield f"h{len(heading.group(1))}", heading.group(2).strip()
        elif item:
            yield ("ol" if item.group(1)[0].isdigit() else "ul"), item.group(2).strip()
        elif line.strip():
            paragraph.append(line.strip())


def build_pdf(source: Path, target: Path, page_word: str) -> None:
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.lib.units import cm
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer
    from xml.sax.saxutils import escape
    from reportlab import rl_config

    rl_config.invariant = 1  # reproducible bytes (no timestamps or random ids)
    styles = getSampleStyleSheet()
    title = next(payload for kind, payload in blocks(source.read_text(encoding="utf-8")) if kind == "h1")
    story, number = [], 0
    for kind, payload in blocks(source.read_text(encoding="utf-8")):
        text = escape(payload)
        if kind in ("h1", "h2", "h3"):
            story.append(Paragraph(text, styles[{"h1": "Heading1", "h2": "Heading2", "h3": "Heading3"}[kind]]))
            number = 0
        elif kind == "ul":
            story.append(Paragraph(text, styles["BodyText"], bulletText="•"))
        elif kind == "ol":
            number += 1
            story.append(Paragraph(text, styles["BodyText"], bulletText=f"{number}."))
        else:
            story.append(Paragraph(text, styles["BodyText"]))
            story.append(Spacer(1, 4))

    def decorate(canvas, doc):
        canvas.saveState()
        canvas.setFont("Helvetica", 8)
        canvas.drawString(2 * cm, A4[1] - 1.2 * cm, f"Acme Datenwerk GmbH · Internal · {title}")
        canvas.drawRightString(A4[0] - 2 * cm, 1.2 * cm, f"{page_word} {doc.page}")
        canvas.restoreState()

    target.parent.mkdir(parents=True, exist_ok=True)
    doc = SimpleDocTemplate(str(target), pagesize=A4, title=title, author="Acme Datenwerk GmbH",
                            topMargin=2.2 * cm, bottomMargin=2.2 * cm)
    doc.build(story, onFirstPage=decorate, onLaterPages=decorate)


def build_docx(source: Path, target: Path) -> None:
    import datetime as dt

    import docx

    document = docx.Document()
    for kind, payload in blocks(source.read_text(encoding="utf-8")):
        if kind == "h1":
            document.add_heading(payload, level=0)
            document.core_properties.title = payload
        elif kind in ("h2", "h3"):
            document.add_heading(payload, level=int(kind[1]) - 1)
        elif kind == "ul":
            document.add_paragraph(payload, style="List Bullet")
        elif kind == "ol":
            document.add_paragraph(payload, style="List Number")
        else:
            document.add_paragraph(payload)
    document.core_properties.author = "Acme Datenwerk GmbH"
    document.core_properties.created = dt.datetime(2026, 1, 15, 9, 0, 0)
    target.parent.mkdir(parents=True, exist_ok=True)
    document.save(str(target))


def main() -> int:
    for name, (target, page_word) in PDFS.items():
        build_pdf(HERE / name, DOCS / target, page_word)
        print(f"wrote {DOCS / target}")
    for name, target in DOCXS.items():
        build_docx(HERE / name, DOCS / target)
        print(f"wrote {DOCS / target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
