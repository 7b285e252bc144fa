"""One bad file never stops, hangs or floods ingest: it is skipped with a one-line reason, the rest goes on.

Each case here once raised a traceback, blocked forever, or took time or memory far beyond its
size (issue 26, item 15). Tests call `ingest_folder` (the stage minus its manifest bookkeeping)
with the tiny tokenizer; `test_stage.py` covers the manifest itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from contextlib import contextmanager

import pytest

from sovllm.config import Config
from sovllm.ingest import loaders
from sovllm.ingest.document import LoadedDocument, Section
from sovllm.ingest.stage import ingest_folder
from tests.ingest.conftest import deadline

GOOD = "# Travel\n\nHotels in Leipzig cost 110 EUR per night.\n"


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "documents"
    folder.mkdir()
    (folder / "good.md").write_text(GOOD, encoding="utf-8")
    return folder


def ingest(folder, tokenizer) -> dict:
    """`ingest_folder` on `folder`; checks what holds for every run, whatever was skipped."""
    cfg = Config.model_validate({"ingest": {"chunk_size": 128, "chunk_overlap": 16}})
    warnings: list[str] = []
    result = ingest_folder(folder, tokenizer, cfg, warn=warnings.append)
    for entry in result["skipped"]:
        assert entry["reason"].strip() and "\n" not in entry["reason"], entry
    # the outputs are strict, UTF-8-encodable JSON (no lone surrogates from file names, no NaN)
    json.dumps([result["records"], result["skipped"]], ensure_ascii=False, allow_nan=False).encode("utf-8")
    assert "good.md" in [d["path"] for d in result["documents"]]  # the rest of the folder went on
    result["warnings"] = warnings
    return result


def reasons(result) -> dict[str, str]:
    return {entry["path"]: entry["reason"] for entry in result["skipped"]}


# --- the folder: names, file types, links, depth, size ----------------------------------------------


def test_a_file_name_that_is_not_utf8_is_skipped_with_its_bytes_escaped(docs, tokenizer):
    try:
        (docs / os.fsdecode(b"caf\xe9.md")).write_text(GOOD.replace("Leipzig", "Halle"), encoding="utf-8")
        (docs / os.fsdecode(b"d\xfcr")).mkdir()
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    (docs / os.fsdecode(b"d\xfcr") / "notes.md").write_text(GOOD.replace("Leipzig", "Jena"), encoding="utf-8")
    result = ingest(docs, tokenizer)
    skipped = reasons(result)
    assert set(skipped) == {"caf\\xe9.md", "d\\xfcr/notes.md"}
    assert all("not valid UTF-8" in reason and "rename" in reason for reason in skipped.values())


@contextmanager
def unblock_fifo(path):
    """Keep opening and closing the FIFO's write end, so a reader blocked on it gets end-of-file.

    Without this, code that opens the FIFO for reading (as ingest once did) blocks forever and
    the test hangs instead of failing. Code that never opens it leaves this loop idle.
    """
    stop = threading.Event()

    def run():
        while not stop.is_set():
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # ENXIO: nobody is reading it
                pass
            stop.wait(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def test_only_regular_files_inside_the_folder_are_read(docs, tokenizer, tmp_path):
    os.mkfifo(docs / "pipe.md")
    os.symlink("pipe.md", docs / "alias.md")  # a link inside the folder, to the FIFO
    os.symlink("/dev/null", docs / "null.md")
    secret = tmp_path / "secret.md"
    secret.write_text("# Secret\n\nThe root password is hunter2.\n", encoding="utf-8")
    os.symlink(secret, docs / "linked-secret.md")  # out of the folder: never followed
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", docs / "linked-folder")
    (docs / "sub").mkdir()
    (docs / "sub" / "trip.md").write_text(GOOD.replace("Leipzig", "Dresden"), encoding="utf-8")
    os.symlink("sub/trip.md", docs / "shortcut.md")  # inside the folder, to a regular file: followed
    with unblock_fifo(docs / "pipe.md"), deadline(60):
        result = ingest(docs, tokenizer)
    skipped = reasons(result)
    assert set(skipped) == {"pipe.md", "alias.md", "null.md", "linked-secret.md", "linked-folder"}
    assert "not a regular file" in skipped["pipe.md"] and "FIFO" in skipped["pipe.md"]
    assert "not a regular file" in skipped["alias.md"] and "FIFO" in skipped["alias.md"]
    assert "outside the documents folder" in skipped["null.md"]
    assert "outside the documents folder" in skipped["linked-secret.md"]
    assert "link to a folder" in skipped["linked-folder"]
    assert {"shortcut.md", "sub/trip.md"} <= {d["path"] for d in result["documents"]}
    assert not any("hunter2" in record["text"] for record in result["records"])


def test_a_symlink_to_dev_zero_is_never_read(tmp_path):
    folder = tmp_path / "documents"
    folder.mkdir()
    os.symlink("/dev/zero", folder / "zero.md")
    # In a child process with 2 GiB of address space: code that read the link would fail with
    # MemoryError there instead of exhausting this machine.
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "from pathlib import Path\n"
        "from sovllm.config import Config\n"
        "from sovllm.errors import InputError\n"
        "from sovllm.ingest.stage import ingest_folder\n"
        "try:\n"
        "    ingest_folder(Path(sys.argv[1]), None, Config.model_validate({}), warn=lambda _: None)\n"
        "except InputError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "zero.md: symbolic link to a file outside the documents folder" in done.stdout


def test_folders_deeper_than_the_recursion_limit_are_walked(docs, tokenizer):
    deepest = docs
    for _ in range(sys.getrecursionlimit() + 100):
        deepest = deepest / "d"
        os.mkdir(deepest)
    (deepest / "deep.md").write_text(GOOD.replace("Leipzig", "Görlitz"), encoding="utf-8")
    try:
        result = ingest(docs, tokenizer)
        assert any(d["path"].endswith("/d/deep.md") for d in result["documents"])
    finally:  # shutil.rmtree (and pytest's clean-up) would recurse as deep: remove it bottom-up
        (deepest / "deep.md").unlink()
        while deepest != docs:
            deepest.rmdir()
            deepest = deepest.parent


def sparse(path, size: int):
    with open(path, "wb") as fh:
        fh.truncate(size)  # no data written: the test costs nothing, reading it would
    return path


def test_files_over_the_size_limits_are_skipped_without_being_read(docs, tokenizer, monkeypatch):
    sparse(docs / "huge.pdf", 300 << 20)  # over the 256 MiB limit for any file
    sparse(docs / "huge.txt", 20 << 20)  # over the 16 MiB limit for text formats
    (docs / "long.md").write_text("# Long\n\n" + "Many words here. " * 100, encoding="utf-8")
    monkeypatch.setattr("sovllm.ingest.limits.MAX_TEXT_CHARS", 1000)  # extracted text per document
    skipped = reasons(ingest(docs, tokenizer))
    assert set(skipped) == {"huge.pdf", "huge.txt", "long.md"}
    assert skipped["huge.pdf"].startswith("too large (300.0 MiB; the limit is 256.0 MiB")
    assert skipped["huge.txt"].startswith("too large for a text format (20.0 MiB")
    assert skipped["long.md"] == "too much text (1,699 characters; the limit is 1,000 per document): split it"


# --- loaders: failures, time budget --------------------------------------------------------------------


@contextmanager
def extra_loader(suffix: str, fn):
    loaders.register_loader(suffix)(fn)
    try:
        yield
    finally:
        loaders.LOADERS.pop(suffix)


def test_a_loader_that_fails_unexpectedly_skips_only_its_file(docs, tokenizer):
    def broken(path):
        return {}["no such key"] if path.name == "a.boom" else 1 / 0

    (docs / "a.boom").write_text("x")
    (docs / "b.boom").write_text("x")
    with extra_loader(".boom", broken):
        skipped = reasons(ingest(docs, tokenizer))
    assert skipped == {"a.boom": "could not be loaded (KeyError: 'no such key')",
                       "b.boom": "could not be loaded (ZeroDivisionError: division by zero)"}


def test_a_file_over_the_time_budget_is_skipped(docs, tokenizer, monkeypatch):
    def slow(path):  # a parser stuck in a loop (without the budget it gives up after 10 s)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            pass
        return LoadedDocument([Section("finally done", ["Slow"])])

    (docs / "stuck.slow").write_text("x")
    monkeypatch.setattr("sovllm.ingest.limits.TIME_BUDGET_S", 0.5)
    with extra_loader(".slow", slow):
        skipped = reasons(ingest(docs, tokenizer))
    # without the budget the parser would finish after 10 s and its document would be kept
    assert skipped == {"stuck.slow": "took longer than 0.5 s to load and chunk (the per-file time budget)"}


def test_the_time_budget_gives_back_an_outer_alarm():
    from sovllm.ingest.limits import time_budget

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30)
        with time_budget(5):
            pass
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 25  # the outer alarm is pending again
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with time_budget(5):  # an earlier outer alarm is left alone and fires as it would have
            deadline = time.monotonic() + 10
            while not fired and time.monotonic() < deadline:
                time.sleep(0.01)
        assert fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- text decoding -------------------------------------------------------------------------------------


def test_charsets_that_cannot_decode_the_file_are_skipped(docs, tokenizer):
    (docs / "undefined.html").write_bytes(b'<html><head><meta charset="undefined"></head><body><p>caf\xe9</p>')
    (docs / "unknown.html").write_bytes(b'<html><head><meta charset="klingon-8"></head><body><p>caf\xe9</p>')
    (docs / "odd.txt").write_bytes(b"\xff\xfeA")  # a UTF-16 byte order mark, then half a character
    skipped = reasons(ingest(docs, tokenizer))
    assert skipped == {
        "undefined.html": "not valid UTF-8 (byte 0xe9 at offset 57) nor in its declared charset 'undefined'; "
                          "re-save it as UTF-8",
        "unknown.html": "not valid UTF-8 (byte 0xe9 at offset 57) nor in its declared charset 'klingon-8'; "
                        "re-save it as UTF-8",
        "odd.txt": "not valid UTF-16 despite its byte order mark (at offset 2)",
    }


# --- metadata: YAML front matter and sidecars --------------------------------------------------------------


def alias_bomb(levels: int = 7) -> str:
    """~400 bytes of YAML that expand ×10 per level (to about 80 MB as JSON, then copied into every chunk)."""
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        name, previous = chr(ord("a") + level), chr(ord("a") + level - 1)
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 10) + "]")
    return "\n".join(lines)


def test_hostile_front_matter_skips_the_document(docs, tokenizer):
    body = "\n# Title\n\nBody text that is fine.\n"
    (docs / "recursive.md").write_text("---\nrefs: &a [*a]\n---" + body, encoding="utf-8")
    (docs / "bomb.md").write_text("---\n" + alias_bomb() + "\n---" + body, encoding="utf-8")
    (docs / "deep.md").write_text("---\nx: " + "[" * 40 + "]" * 40 + "\n---" + body, encoding="utf-8")
    (docs / "other.md").write_text(GOOD.replace("Leipzig", "Erfurt"), encoding="utf-8")
    (docs / "other.md.meta.yaml").write_text("owner: &o {team: *o}\n", encoding="utf-8")
    with deadline(60):
        result = ingest(docs, tokenizer)
    assert reasons(result) == {
        "recursive.md": "front matter: recursive YAML alias (*a inside &a)",
        "bomb.md": "front matter: expands to over 65,536 characters (YAML aliases?)",
        "deep.md": "front matter: nested deeper than 32 levels",
        "other.md": "sidecar other.md.meta.yaml: recursive YAML alias (*o inside &o)",
    }
    assert max(len(json.dumps(r["meta"])) for r in result["records"]) < 1000


def test_front_matter_values_yaml_cannot_build_only_drop_the_metadata(docs, tokenizer):
    body = "\n# Title\n\nBody text of {name}.\n"
    (docs / "typo.md").write_text("---\nreviewed: 2024-02-30\n---" + body.format(name="typo"), encoding="utf-8")
    (docs / "digits.md").write_text("---\nn: " + "9" * 5000 + "\n---" + body.format(name="digits"), encoding="utf-8")
    (docs / "list.md").write_text("---\n- a\n- b\n---" + body.format(name="list"), encoding="utf-8")
    (docs / "nan.md").write_text("---\nscore: .nan\nlimit: .inf\n---" + body.format(name="nan"), encoding="utf-8")
    result = ingest(docs, tokenizer)
    assert not result["skipped"]
    meta = {r["source"]["path"]: r["meta"] for r in result["records"]}
    assert meta["typo.md"] == meta["digits.md"] == meta["list.md"] == {}
    assert meta["nan.md"] == {"score": "nan", "limit": "inf"}  # JSON has no NaN or Infinity
    warnings = " ".join(result["warnings"])
    assert "typo.md: front matter ignored: invalid value (day is out of range for month)" in warnings
    assert "digits.md: front matter ignored: invalid value" in warnings
    assert "list.md: front matter ignored: not a mapping" in warnings


# --- HTML ---------------------------------------------------------------------------------------------------


def html_time(path) -> float:
    from sovllm.ingest.loaders_html import load_html

    times = []
    for _ in range(2):  # CPU seconds of this thread: other processes on the machine do not skew the ratio
        started = time.thread_time()
        load_html(path)
        times.append(time.thread_time() - started)
    return min(times)


HOSTILE_HTML = {  # kind: (input of about n characters, n for the smaller input)
    "nested divs": (lambda n: "<p>before</p>" + "<div>" * (n // 5) + "deep" + "</div>" * (n // 5), 6_250),
    "unclosed tags": (lambda n: "<p>before</p>" + "<a" * (n // 2), 25_000),
    "stray end tags": (lambda n: "<p>before</p>" + "</" * (n // 2), 25_000),
    "processing instructions": (lambda n: "<p>before</p>" + "<?" * (n // 2), 25_000),
    "CDATA openings": (lambda n: "<p>before</p>" + "<![CDATA[" * (n // 9), 25_000),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_HTML))
def test_hostile_html_loads_in_linear_time(tmp_path, kind):
    from sovllm.ingest.loaders_html import load_html

    build, n = HOSTILE_HTML[kind]
    small, big = tmp_path / "small.html", tmp_path / "big.html"
    small.write_text(build(n), encoding="utf-8")
    big.write_text(build(8 * n), encoding="utf-8")
    with deadline(60):  # 1,250 nested divs were a RecursionError; html.parser is quadratic on the rest
        t_small = max(html_time(small), 0.02)
        t_big = html_time(big)
    assert t_big < 24 * t_small, (kind, t_small, t_big)  # 8x the input: ~8x when linear, 64x when quadratic
    assert load_html(small).sections[0].text.startswith("before")  # the content is kept


def test_nested_html_tables_and_lists_give_text_linear_in_their_size(tmp_path):
    from sovllm.ingest.loaders_html import load_html

    tables = tmp_path / "tables.html"
    tables.write_text("<body>" + "<table><tr><td>cell " * 300 + "x" + "</td></tr></table>" * 300, encoding="utf-8")
    lists = tmp_path / "lists.html"
    lists.write_text("<body>" + "<ul><li>item " * 3000 + "x" + "</li></ul>" * 3000, encoding="utf-8")
    for path, word in ((tables, "cell"), (lists, "item")):
        text = "\n".join(s.text for s in load_html(path).sections)
        assert text.count(word) == (300 if word == "cell" else 3000)  # each once: no cell text repeated
        assert len(text) < 2 * path.stat().st_size  # the old loader's output grew with the square


# --- DOCX ---------------------------------------------------------------------------------------------------


def docx_with_table(path, rows: int, first_row_continues: bool = False):
    import docx

    document = docx.Document()
    document.add_heading("Schedule", level=1)
    table = document.add_table(rows=rows, cols=2)
    for index, row in enumerate(table.rows):
        label, value = row.cells
        value.text = f"slot {index}"
        if index == 0 and not first_row_continues:
            label.text = "Monday"
            label._tc.vMerge = "restart"
        else:
            label._tc.vMerge = "continue"  # merged with the cell above
    document.save(str(path))
    return path


def test_docx_vertical_merges_are_read_in_one_pass(docs, tokenizer):
    docx_with_table(docs / "long-merge.docx", rows=1100)  # python-docx: 20 s for 600 rows, RecursionError at 1,100
    docx_with_table(docs / "first-row.docx", rows=3, first_row_continues=True)  # python-docx: ValueError
    result = ingest(docs, tokenizer)
    assert not result["skipped"]
    texts: dict[str, str] = {}
    for record in result["records"]:
        path = record["source"]["path"]
        texts[path] = texts.get(path, "") + "\n" + record["text"]
    assert "Monday | slot 0\nMonday | slot 1" in texts["long-merge.docx"]
    assert "Monday | slot 1099" in texts["long-merge.docx"]
    assert "| slot 0\n | slot 1\n | slot 2" in texts["first-row.docx"]  # nothing above: an empty cell


def test_a_docx_that_unpacks_to_too_much_is_skipped(docs, tokenizer, monkeypatch):
    import docx

    document = docx.Document()
    document.add_paragraph("Harmless text.")
    document.save(str(docs / "bomb.docx"))
    with zipfile.ZipFile(docs / "bomb.docx", "a", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("word/media/padding.bin", bytes(4 << 20))  # 4 MiB of zeros: a 4 KiB member
    monkeypatch.setattr("sovllm.ingest.limits.MAX_UNPACKED_BYTES", 2 << 20)
    skipped = reasons(ingest(docs, tokenizer))
    assert skipped["bomb.docx"].startswith("DOCX unpacks to 4.")
    assert skipped["bomb.docx"].endswith("(the limit is 2.0 MiB; a zip bomb?)")
