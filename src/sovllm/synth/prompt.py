"""Prompt rendering for QA generation: Jinja templates per language, overridable per project.

The package ships `system.<lang>.j2` and `qa.<lang>.j2` (a whole chunk, all question types in one
request: for strong endpoints) and `question.<lang>.j2` (one answer sentence → its question: the
extractive mode used with small models) for English and German; a chunk detected
as German gets the German prompt, every other language the English one. A project can override
any of these files by putting a file of the same name into `synth.prompt_dir`. The hash of the
templates a chunk used is part of its cache key, so editing a prompt regenerates its pairs.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import jinja2

from sovllm.errors import ConfigError

LANGUAGES = ("en", "de")
DESCRIPTIONS = {
    "factual": "a question about one specific fact (a name, number, date or rule)",
    "conceptual": "a question about why or how something is done",
    "comparison": "a question that compares two things the text mentions",
}
DESCRIPTIONS_DE = {
    "factual": "eine Frage nach einem bestimmten Fakt (Name, Zahl, Datum oder Regel)",
    "conceptual": "eine Frage, warum oder wie etwas gemacht wird",
    "comparison": "eine Frage, die zwei im Text genannte Dinge vergleicht",
}
class PromptSet:
    """Renders the chat messages for one chunk; knows the hash of the templates it used."""

    def __init__(self, override_dir: Path | None = None):
        self.override_dir = override_dir
        if override_dir is not None and not override_dir.is_dir():
            raise ConfigError(f"synth.prompt_dir {override_dir} does not exist")
        self._env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False,
                                       autoescape=False)
        self._sources: dict[str, str] = {}

    def source(self, name: str) -> str:
        if name not in self._sources:
            override = self.override_dir / name if self.override_dir else None
            if override is not None and override.is_file():
                self._sources[name] = override.read_text(encoding="utf-8")
            else:
                self._sources[name] = resources.files("sovllm.synth").joinpath("prompts", name).read_text("utf-8")
        return self._sources[name]

    @staticmethod
    def language(chunk_lang: str | None) -> str:
        return chunk_lang if chunk_lang in LANGUAGES else "en"

    def template_hash(self, lang: str) -> str:
        blob = "\0".join(self.source(f"{name}.{lang}.j2") for name in ("system", "qa", "question"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    def render_question(self, chunk: dict, type_: str, answer: str) -> list[dict]:
        """The message asking for the question that `answer` (sentences of the chunk) answers.

        Extractive mode: one short request per answer, no system prompt and no chunk, which is
        what a 135M model handles best (measured: long multi-part prompts made it ask generic
        or copied questions).
        """
        lang = self.language(chunk.get("lang"))
        try:
            user = self._env.from_string(self.source(f"question.{lang}.j2")).render(
                answer=answer, type=type_, heading_path=chunk.get("heading_path") or []).strip()
        except jinja2.TemplateError as exc:
            raise ConfigError(f"synth prompt template question.{lang}.j2: {exc}") from None
        return [{"role": "user", "content": user}]

    def render(self, chunk: dict, types: list[str], *, extractive: bool = False) -> list[dict]:
        """System and user messages asking for one pair of each of `types` about `chunk`.

        With `extractive`, the prompt asks the model to pick the answer sentence first (the schema
        then only allows sentences of the chunk) and to write the question for it.
        """
        lang = self.language(chunk.get("lang"))
        context = {
            "text": chunk["text"], "heading_path": chunk.get("heading_path") or [], "types": types,
            "descriptions": DESCRIPTIONS, "descriptions_de": DESCRIPTIONS_DE, "extractive": extractive,
        }
        try:
            system = self._env.from_string(self.source(f"system.{lang}.j2")).render(**context).strip()
            user = self._env.from_string(self.source(f"qa.{lang}.j2")).render(**context).strip()
        except jinja2.TemplateError as exc:
            raise ConfigError(f"synth prompt template qa.{lang}.j2 / system.{lang}.j2: {exc}") from None
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]
