"""Each loader on small real files: structure kept, boilerplate removed, bad files skipped."""

from __future__ import annotations

import pytest

from sovllm.ingest.document import SkipDocument
from sovllm.ingest.loaders import load_markdown, load_text, loader_for
from sovllm.ingest.loaders_html import load_html
from sovllm.ingest.loaders_office import load_docx, load_pdf
from tests.ingest.conftest import make_pdf


def by_path(doc):
    return {" > ".join(s.heading_path): s.text for s in doc.sections}


def test_markdown_front_matter_headings_code_and_tables(tmp_path):
    path = tmp_path / "policy.md"
    path.write_text(
        "---\ntitle: VPN Policy\nowner: IT\n---\n"
        "Intro before any heading.\n\n"
        "# VPN\n\nUse **Tunnelwerk** on [public networks](https://x.example).\n\n"
        "## Limits\n\n| Item | Value |\n|------|------:|\n| Session | 9 h |\n\n"
        "```bash\n# not a heading\nwg-quick up acme\n```\n\n"
        "Setext Title\n============\n\nBody under setext.\n",
        encoding="utf-8",
    )
    doc = load_markdown(path)
    assert doc.metadata == {"title": "VPN Policy", "owner": "IT"}
    sections = by_path(doc)
    assert sections[""] == "Intro before any heading."
    assert sections["VPN"] == "Use Tunnelwerk on public networks."
    assert "| Item | Value |\n| Session | 9 h |" in sections["VPN > Limits"]
    assert "# not a heading\nwg-quick up acme" in sections["VPN > Limits"]
    assert sections["Setext Title"] == "Body under setext."


def test_markdown_with_broken_front_matter_still_loads(tmp_path):
    path = tmp_path / "a.md"
    path.write_text("---\ntitle: [unclosed\n---\n# T\n\nText.\n", encoding="utf-8")
    doc = load_markdown(path)
    assert by_path(doc) == {"T": "Text."} and "front matter ignored" in doc.warnings[0]


def test_plain_text_caps_lines_are_headings(tmp_path):
    path = tmp_path / "offices.txt"
    path.write_text("LEIPZIG OFFICE\n\nQuerstraße 17, open 07:00–20:00.\nBadge needed.\n\nPARKING\n\n12 spaces.\n",
                    encoding="utf-8")
    assert by_path(load_text(path)) == {"Leipzig Office": "Querstraße 17, open 07:00–20:00.\nBadge needed.",
                                        "Parking": "12 spaces."}


HTML = """<!doctype html><html><head><meta charset="iso-8859-1"><title>Handbook</title>
<style>body{color:red}</style><script>var tracking = "do not index";</script></head><body>
<nav><a href="/">Home</a> <a href="/x">Products</a></nav>
<div class="breadcrumb">Kompass &gt; Products &gt; Ledgerline</div>
<div id="cookie-banner">We use cookies. Accept?</div>
<header><h1>Site header brand</h1></header>
<main><article>
<h1>Ledgerline Handbook</h1><p>Intro paragraph with <strong>bold</strong> text.</p>
<h2>Editions</h2>
<ul><li>Core: 250 users<ul><li>nested detail</li></ul></li><li>Plus: 2,000 users</li></ul>
<ol start="3"><li>third step</li><li>fourth step</li></ol>
<table><tr><th>Edition</th><th>Users</th></tr><tr><td>Core</td><td>250</td></tr></table>
<h3>Limits</h3><div>Loose text in a div.<br>Second line.</div>
<h2>Größen</h2><p>Überprüfung läuft.</p>
</article></main><aside>Related pages</aside><footer>© Acme Datenwerk</footer></body></html>"""


def test_html_keeps_structure_and_drops_chrome(tmp_path):
    path = tmp_path / "handbook.html"
    path.write_bytes(HTML.encode("iso-8859-1"))  # declared charset, not UTF-8
    doc = load_html(path)
    assert doc.metadata == {"title": "Handbook"}
    sections = by_path(doc)
    assert sections["Ledgerline Handbook"] == "Intro paragraph with bold text."
    editions = sections["Ledgerline Handbook > Editions"]
    assert "- Core: 250 users\n  - nested detail\n- Plus: 2,000 users" in editions
    assert "3. third step\n4. fourth step" in editions
    assert "Edition | Users\nCore | 250" in editions
    assert sections["Ledgerline Handbook > Editions > Limits"] == "Loose text in a div.\nSecond line."
    assert sections["Ledgerline Handbook > Größen"] == "Überprüfung läuft."
    everything = " ".join(sections) + " ".join(sections.values())
    for chrome in ("tracking", "Home", "cookies", "Kompass >", "Related pages", "©", "Site header", "color:red"):
        assert chrome not in everything


def test_pdf_pages_headings_and_running_headers(tmp_path):
    pages = [
        [("Retention Policy", 16), ("Invoices are kept for ten years after the end", 10),
         ("of the calendar year; logs for ninety days.", 10)],
        [("Backups", 14), ("Nightly backups run at 01:30 CET and are repli-", 10),
         ("cated to AMS-1 within forty minutes.", 10)],
        [("Restores", 14), ("A restore needs a Hafen ticket approved by the CISO.", 10)],
    ]
    doc = load_pdf(make_pdf(tmp_path / "policy.pdf", pages))
    sections = doc.sections
    assert [s.heading_path for s in sections] == [["Retention Policy"], ["Retention Policy", "Backups"],
                                                  ["Retention Policy", "Restores"]]
    assert sections[0].text == "Invoices are kept for ten years after the end of the calendar year; logs for ninety days."
    assert sections[1].text == "Nightly backups run at 01:30 CET and are replicated to AMS-1 within forty minutes."
    assert [s.page_at(0) for s in sections] == [1, 2, 3]
    text = " ".join(s.text for s in sections)
    assert "ACME Internal" not in text and "Page" not in text


def test_pdf_problems_are_skipped_with_reasons(tmp_path):
    encrypted = make_pdf(tmp_path / "secret.pdf", [[("Secret text", 10)]], encrypt="s3cret")
    with pytest.raises(SkipDocument, match="encrypted PDF"):
        load_pdf(encrypted)
    from reportlab.pdfgen import canvas

    c = canvas.Canvas(str(tmp_path / "scan.pdf"))
    c.rect(10, 10, 100, 100)  # an image-only page: no text layer
    c.showPage()
    c.save()
    with pytest.raises(SkipDocument, match="no text layer"):
        load_pdf(tmp_path / "scan.pdf")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 garbage")
    with pytest.raises(SkipDocument, match="not a readable PDF"):
        load_pdf(tmp_path / "broken.pdf")


def test_docx_headings_lists_and_tables(tmp_path):
    import docx

    document = docx.Document()
    document.add_heading("Onboarding", level=0)
    document.add_paragraph("Welcome to Acme.")
    document.add_heading("Accounts", level=1)
    document.add_paragraph("Blue key daily", style="List Bullet")
    document.add_paragraph("Grey key in the safe", style="List Bullet")
    table = document.add_table(rows=2, cols=2)
    for r, row in enumerate([("Key", "Colour"), ("Daily", "blue")]):
        for c, value in enumerate(row):
            table.cell(r, c).text = value
    document.add_heading("Laptop", level=2)
    document.add_paragraph("LUKS or FileVault.")
    document.core_properties.title = "Onboarding Guide"
    document.save(str(tmp_path / "guide.docx"))
    doc = load_docx(tmp_path / "guide.docx")
    assert doc.metadata == {"title": "Onboarding Guide"}
    assert by_path(doc) == {
        "Onboarding": "Welcome to Acme.",
        "Onboarding > Accounts": "- Blue key daily\n- Grey key in the safe\n\nKey | Colour\nDaily | blue",
        "Onboarding > Accounts > Laptop": "LUKS or FileVault.",
    }
    (tmp_path / "fake.docx").write_bytes(b"\xd0\xcf\x11\xe0 an OLE container, as Office writes encrypted files")
    with pytest.raises(SkipDocument, match="not a valid DOCX"):
        load_docx(tmp_path / "fake.docx")


@pytest.mark.parametrize("name,content,reason", [
    ("empty.md", b"", "empty file"),
    ("blank.txt", b"  \n\n ", "empty file"),
    ("binary.txt", b"abc\x00\x01\x02def", "binary content"),
    ("latin1.md", "Überstunden".encode("latin-1"), "not valid UTF-8 (byte 0xdc at offset 0)"),
])
def test_text_problems_are_skipped_with_reasons(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SkipDocument, match=reason.replace("(", r"\(").replace(")", r"\)")):
        loader_for(path)(path)


def test_utf16_with_bom_is_read(tmp_path):
    path = tmp_path / "win.txt"
    path.write_bytes("Grüße aus Leipzig.".encode("utf-16"))
    assert load_text(path).sections[0].text == "Grüße aus Leipzig."


def test_registry_is_extensible(tmp_path):
    from sovllm.ingest import loaders
    from sovllm.ingest.document import LoadedDocument, Section

    @loaders.register_loader(".rst")
    def load_rst(path):
        return LoadedDocument([Section(path.read_text(), ["RST"])])

    try:
        (tmp_path / "a.rst").write_text("hello")
        assert loader_for(tmp_path / "a.rst")(tmp_path / "a.rst").sections[0].heading_path == ["RST"]
    finally:
        loaders.LOADERS.pop(".rst")
    assert loader_for(tmp_path / "a.xyz") is None
