"""Project configuration: strict pydantic models, YAML loading and dotted `--set` overrides.

A project is a folder with `sovllm.yaml`. Every section is a model with `extra="forbid"`, so a typo
is an error that names the key, the file and line, and the closest valid key. All problems of a
file are reported together, not one per run. `--set ingest.chunk_size=256` overrides a value; the
value is parsed as YAML (numbers, booleans, lists) and validated like the file.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import typing
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sovllm.egress import Policy, parse_allow_entry
from sovllm.errors import ConfigError

CONFIG_FILE = "sovllm.yaml"

DEFAULT_SYSTEM_PROMPT = (
    "You answer questions about internal documents. Use only the context given in the user's "
    "message. If the context does not contain the answer, reply exactly with the refusal sentence. "
    "Do not mention the context itself; answer in complete sentences in the language of the question."
)
DEFAULT_REFUSAL = "The provided context does not contain enough information to answer this question."


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LocationsSection(Section):
    """Where each stage's folder lives (null: `<output_dir>/<stage>`); relative paths are relative to
    the project folder. A stage reads its inputs from, and writes its output to, these folders."""

    chunks: str | None = Field(None, description="ingest's output (default out/ingest)")
    pairs: str | None = Field(None, description="synth's output (default out/synth)")
    splits: str | None = Field(None, description="curate's output (default out/curate)")
    adapter: str | None = Field(None, description="train's output (default out/train)")
    report: str | None = Field(None, description="eval's output (default out/eval)")
    mlflow: str | None = Field(None, description="the project's own MLflow store (default out/mlflow)")
    shards: str | None = Field(None, description="synth --shard K/N outputs, in K-of-N sub-folders (default "
                                                 "<pairs>/shards)")


class ProjectSection(Section):
    name: str = "sovllm-project"
    documents: str = "documents"
    output_dir: str = "out"
    locations: LocationsSection = Field(default_factory=LocationsSection)


class ModelSection(Section):
    base: str = Field("smollm2-135m-instruct", description="registry name or a local Hugging Face model directory")


class PromptSection(Section):
    system: str = DEFAULT_SYSTEM_PROMPT
    refusal: str = DEFAULT_REFUSAL

    @field_validator("system", "refusal")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class EgressSection(Section):
    allow: list[str] = Field(default_factory=list)
    # an HTTP(S) or SOCKS proxy for sovllm's own clients; its host must be allowed. Without it, proxy
    # variables (HTTP_PROXY, ...) are ignored: they could carry requests past the allow-list.
    proxy: str | None = None

    @model_validator(mode="after")
    def _proxy_allowed(self) -> "EgressSection":
        if self.proxy is None:
            return self
        from urllib.parse import urlsplit


        url = urlsplit(self.proxy)
        if url.scheme not in ("http", "https", "socks5", "socks5h") or not url.hostname:
            raise ValueError(f"proxy {self.proxy!r} must be a URL such as http://proxy.internal:3128")
        if not Policy(self.allow).allows(url.hostname):
            raise ValueError(f"proxy host {url.hostname!r} must be listed in egress.allow")
        return self

    @field_validator("allow")
    @classmethod
    def _valid_entries(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            parse_allow_entry(entry)  # ValueError names the entry
        return entries


class EndpointSection(Section):
    base_url: str | None = Field(None, description="OpenAI-compatible base URL; null = embedded server")
    model: str | None = None
    api_key_env: str | None = None
    adapter_loading: Literal["api", "folder", "none"] = Field(
        "api", description="how eval makes a new adapter available to a configured endpoint: api = vLLM's "
                           "/v1/load_lora_adapter (the server must see the adapter's path), folder = copy it into "
                           "adapter_dir (vLLM's VLLM_LORA_RESOLVER_CACHE_DIR), none = the endpoint serves it already")
    adapter_dir: str | None = Field(None, description="with adapter_loading: folder, the folder vLLM's filesystem "
                                                      "resolver loads adapters from")
    base_model_path: str | None = Field(None, description="with adapter_loading: folder, the --model string the "
                                                          "endpoint's vLLM was started with (written into the "
                                                          "adapter's base_model_name_or_path, which the resolver "
                                                          "compares)")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"'{value}' is not an http(s) URL such as http://127.0.0.1:8000/v1")
        return value


class IngestSection(Section):
    chunk_size: int = Field(512, ge=32, le=8192)
    chunk_overlap: int = Field(64, ge=0)
    languages: list[str] = Field(default_factory=lambda: ["en", "de", "fr", "es", "it", "nl", "pt", "pl"])
    quick_documents: int = Field(4, ge=1, description="documents ingested under --quick")
    min_tokens: int = Field(500, ge=0, description="ingest refuses a corpus with fewer tokens: too little text for "
                                                   "train, val and eval pairs (four short pages have ~1,800)")

    @field_validator("languages")
    @classmethod
    def _iso_codes(cls, codes: list[str]) -> list[str]:
        for code in codes:
            if not re.fullmatch(r"[a-z]{2,3}", code):
                raise ValueError(f"'{code}' is not an ISO 639-1 language code such as en or de")
        return codes

    @model_validator(mode="after")
    def _overlap_below_size(self) -> "IngestSection":
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError(f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_size ({self.chunk_size})")
        return self


QA_TYPES = ("factual", "conceptual", "comparison")


class SynthSection(Section):
    types: list[Literal["factual", "conceptual", "comparison"]] = Field(default_factory=lambda: list(QA_TYPES))
    concurrency: int = Field(32, ge=1, le=256)
    temperature: float = Field(0.5, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    seed: int = 0
    max_attempts: int = Field(3, ge=1, le=10)
    grounding: float = Field(0.6, ge=0.0, le=1.0, description="share of an answer's content words found in the chunk")
    question_max_chars: int = Field(120, ge=20, le=1000)
    answer_max_chars: int = Field(240, ge=20, le=2000)
    timeout_s: float = Field(300, gt=0)
    answer_mode: Literal["auto", "extractive", "free"] = Field(
        "auto", description="extractive: answers are sentences of the chunk; auto = extractive on the embedded server")
    prompt_dir: str | None = Field(None, description="project folder with qa.en.j2 / qa.de.j2 to override the prompts")
    quick_chunks: int = Field(12, ge=1, description="chunks sent to synth under --quick")
    structure: list[Literal["faq", "overview", "field", "table"]] = Field(
        default_factory=lambda: ["faq", "overview", "field", "table"],
        description="pairs read off the documents without a model: FAQ questions with their answers, an overview "
                    "question per section heading, 'Label: value' lines and table rows with templated questions; "
                    "[] = off")
    model_pairs: Literal["auto", "all", "fill"] = Field(
        "all", description="all: ask the model for every chunk; fill: only for chunks without structure pairs; "
                           "auto = all (kept for older configs)")
    pairs_per_chunk: int = Field(
        4, ge=1, le=16,
        description="extractive mode: questions asked per chunk, each for a different statement (spread over the "
                    "types and the chunk's sections); free mode asks one pair per type. 4: after their structure "
                    "pairs, 75 of examples/acme's 86 English chunks (~375 tokens) still have 4 distinct statements "
                    "(64 have 5), and acme's synth stays at 210 s of its 6-minute budget (docs/synth.md)")
    model_languages: list[str] | None = Field(
        None, description="languages of the chunks the model writes questions for; null = every language, except "
                          "with the bundled SmolLM2-135M: [en] (its German questions are word salad, docs/synth.md)")

    @field_validator("types")
    @classmethod
    def _unique_types(cls, types: list[str]) -> list[str]:
        if not types or len(set(types)) != len(types):
            raise ValueError("list each question type once, at least one")
        return types


RULE_FLAGS = ("empty", "too_short", "too_long", "generic_question", "mentions_context", "assistant_speak",
              "wrong_language", "copied_question")


class DedupSection(Section):
    exact: bool = True
    near: bool = True
    threshold: float = Field(0.7, gt=0.0, le=1.0, description="estimated Jaccard similarity of question word shingles")
    num_perm: int = Field(128, ge=16, le=1024)


class JudgeSection(Section):
    mode: Literal["auto", "filter", "report", "off"] = Field(
        "auto", description="auto: filter with a configured judge endpoint, report-only with the bundled model")
    rubric: str = "qa-abc"
    keep: list[Literal["A", "B", "C"]] = Field(default_factory=lambda: ["A", "B"])
    report_limit: int = Field(60, ge=1, description="pairs graded in report-only mode (a seeded sample)")
    quick_limit: int = Field(12, ge=1, description="pairs graded under --quick")
    concurrency: int = Field(8, ge=1, le=256)
    max_tokens: int = Field(160, ge=32, le=2048)
    base_url: str | None = Field(None, description="a stronger judge's OpenAI-compatible URL; null = the project endpoint")
    model: str | None = None
    api_key_env: str | None = None

    _url = field_validator("base_url")(EndpointSection._http_url.__func__)

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false

    @field_validator("keep")
    @classmethod
    def _some_kept(cls, keep: list[str]) -> list[str]:
        if not keep:
            raise ValueError("keep at least one rating, e.g. [A, B]")
        return keep


class SplitSection(Section):
    train: float = Field(0.6, ge=0.0, le=1.0)
    val: float = Field(0.1, ge=0.0, le=1.0)
    eval: float = Field(0.3, ge=0.0, le=1.0)
    seed: int = 0
    unit: Literal["auto", "document", "section"] = Field(
        "auto", description="what is split: whole documents (no eval context shares a document with training), or "
                            "sections (a document's chunks under one heading path); auto = document with at least "
                            "min_documents documents, section below")
    min_documents: int = Field(10, ge=3, description="auto: split by document from this many documents on")

    @model_validator(mode="after")
    def _sum_to_one(self) -> "SplitSection":
        total = self.train + self.val + self.eval
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + eval must be 1 (got {total:g})")
        return self


UNANSWERABLE_SHARES = {"train": 0.2, "val": 0.2, "eval": 1 / 3}  # curate.unanswerable defaults


class CurateSection(Section):
    rules: list[str] = Field(default_factory=lambda: list(RULE_FLAGS), description="rule flags that drop a pair")
    question_chars: tuple[int, int] = Field((12, 200), description="allowed question length [min, max]")
    answer_chars: tuple[int, int] = Field((8, 600), description="allowed answer length [min, max]")
    dedup: DedupSection = Field(default_factory=DedupSection)
    judge: JudgeSection = Field(default_factory=JudgeSection)
    splits: SplitSection = Field(default_factory=SplitSection)
    unanswerable: dict[Literal["train", "val", "eval"], float] = Field(
        default_factory=lambda: dict(UNANSWERABLE_SHARES),
        description="share of unanswerable items in each split; a split left out keeps its default")
    max_overlap: float = Field(0.5, ge=0.0, le=1.0,
                               description="a negative is discarded when its question shares more content words "
                                           "with the new context")
    negatives_per_context: float = Field(
        1.0, ge=0.0, le=16.0, description="train only: every training context also carries this many unanswerable "
                                    "questions (on_topic of them its own questions with the answer removed, the rest "
                                    "questions of other documents), answered with the refusal sentence; a chunk's "
                                    "questions share one context (training computes it once); a fraction is drawn per "
                                    "context; 0 = unanswerable.train as a share")
    on_topic: float = Field(0.5, ge=0.0, le=1.0, description="share of the unanswerable items that are on-topic: a "
                                                             "pair's question on its own chunk with the answer-bearing "
                                                             "sentences removed; the rest are questions of other "
                                                             "documents")
    distractors: float = Field(0.3, ge=0.0, le=1.0, description="share of training examples with distractor chunks")
    max_distractors: int = Field(2, ge=1, le=4)
    max_context_tokens: int = Field(800, ge=64, description="distractors are added only while all contexts of an "
                                                            "example stay within this many tokens")
    min_kept: int = Field(10, ge=0, description="fail when fewer answerable pairs survive (four short documents "
                                                "give 20-40)")
    seed: int = 0

    @field_validator("rules")
    @classmethod
    def _known_rules(cls, rules: list[str]) -> list[str]:
        for rule in rules:
            if rule not in RULE_FLAGS:
                close = difflib.get_close_matches(rule, RULE_FLAGS, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"known rules: {', '.join(RULE_FLAGS)}"
                raise ValueError(f"unknown rule '{rule}'; {hint}")
        return rules

    @field_validator("question_chars", "answer_chars")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] < value[1]:
            raise ValueError(f"expected [min, max] with 0 <= min < max (got {list(value)})")
        return value

    @field_validator("unanswerable")
    @classmethod
    def _shares(cls, value: dict) -> dict:
        for split, share in value.items():
            if not 0.0 <= share < 0.9:
                raise ValueError(f"{split}: share must be between 0 and 0.9 (got {share})")
        # `unanswerable: {train: 0.5}` (or --set curate.unanswerable.train=0.5) changes train only:
        # val and eval must not silently lose their unanswerable items
        return {**UNANSWERABLE_SHARES, **value}


LORA_PRESETS = {
    "minimal": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
    "standard": {"r": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "all-linear": {"r": 16, "target_modules": "all-linear"},
    "high-capacity": {"r": 32, "target_modules": "all-linear"},
}


class TrackingSection(Section):
    uri: str | None = Field(None, description="MLflow tracking URI; null = sqlite store in the project's output folder")
    experiment: str | None = Field(None, description="default: the project name")
    registered_model: str | None = Field(None, description="default: '<project>-adapter'")


class TrainSection(Section):
    preset: Literal["minimal", "standard", "all-linear", "high-capacity"] = "standard"
    r: int | None = Field(None, ge=1, le=512, description="overrides the preset's rank")
    alpha: float | None = Field(None, gt=0, description="default: 2 × r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout; on a CPU its masks cost ~15% of a step")
    target_modules: list[str] | None = Field(None, description="overrides the preset's modules")
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    allow_non_vllm_adapter: bool = Field(False, description="permit DoRA, modules_to_save or bias (vLLM cannot serve)")
    qlora: bool = Field(False, description="QLoRA: the base loads as 4-bit NF4 with double quantisation "
                                            "(bitsandbytes), computes in train.precision, trains with gradient "
                                            "checkpointing; the adapter serves on the unquantised base")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when torch sees a GPU, else CPU")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU that has it (fp16 on older ones), fp32 on a CPU; checked against "
                            "the hardware")
    num_processes: int = Field(1, ge=1, le=64, description="training processes (data parallel, one per GPU; on a CPU "
                                                           "they share the cores); > 1 launches torchrun")
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="data parallel across train.num_processes; "
                                                                   "fsdp is not supported yet and is refused")
    epochs: float = Field(2.5, gt=0, description="passes over train.jsonl; more passes teach refusals better "
                                                 "(2.5 chosen on examples/acme)")
    max_steps: int = Field(0, ge=0, description="optimizer steps; 0 = derived from epochs")
    min_steps: int = Field(100, ge=0, description="at least this many optimizer steps when epochs give fewer: a small "
                                                  "corpus gets more passes (examples/klinik: 25 steps from epochs; 100 "
                                                  "raised its eval token F1 gain from +0.067 to +0.190, chosen on that "
                                                  "eval split); 0 = off")
    learning_rate: float = Field(3e-3, gt=0, description="chosen for the 135M bundled model on examples/acme; "
                                                         "larger base models usually want less")
    batch_size: int = Field(1, ge=1, description="micro-batch (with share_prefix: shared-context trees); 2 × 1024 "
                                                  "tokens peak at ~4.7 GB on a CPU (4 × 1024: ~8.4 GB)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step; on a small corpus more, "
                                                   "smaller steps learn more per epoch")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_length: int = Field(1024, ge=32, description="tokens; longer examples are dropped or fail (too_long)")
    too_long: Literal["drop", "fail"] = "drop"
    batching: Literal["grouped", "padded"] = Field(
        "grouped", description="grouped: length-grouped batches; padded: shuffled, pad to longest (the tutorial)")
    share_prefix: bool = Field(True, description="examples whose prompts share a context train as one shared-prefix "
                                                 "tree (the context once, each question after it); batch_size then "
                                                 "counts trees")
    eval_steps: int = Field(50, ge=1, description="val loss every N optimizer steps and at the last one")
    early_stopping_patience: int = Field(3, ge=0, description="evaluations without improvement; 0 = off")
    gradient_checkpointing: bool = False
    threads: int = Field(0, ge=0, description="torch threads; 0 = all cores")
    seed: int = 0
    stop_min_rate: float = Field(0.95, ge=0.0, le=1.0, description="required share of val answers that stop")
    stop_prompts: int = Field(24, ge=1, description="val prompts used for the stop check")
    refusal_calibration: bool = Field(True, description="after training, choose on val a bias on the refusal "
                                                        "sentence's first tokens (stored in the adapter's manifest, "
                                                        "applied by sovllm serve)")
    refusal_max_false: float = Field(0.1, ge=0.0, le=1.0, description="share of answerable val items the calibrated "
                                                                      "adapter may refuse")
    refusal_val_foreign: bool = Field(True, description="the calibration also asks each answerable val question about "
                                                        "another val document's context (as curate builds unanswerable "
                                                        "items): more unanswerable items to choose on")
    refusal_val_on_topic: bool = Field(True, description="the calibration also asks each answerable val question "
                                                         "about its own context with the answer removed (as curate "
                                                         "builds on-topic items)")
    refusal_support: bool = Field(True, description="the calibrated bias also falls with the question's lexical "
                                                    "support in its context (IDF-weighted share of its words found "
                                                    "there); its weight is chosen on val")
    quick_steps: int = Field(4, ge=1, description="optimizer steps under --quick")
    adapter_name: str | None = Field(None, description="default: the project name")
    tracking: TrackingSection = Field(default_factory=TrackingSection)


class EvalJudgeSection(Section):
    enabled: bool = Field(True, description="run the judge checks (they never feed the headline or the promotion)")
    items: int = Field(8, ge=0, description="eval items graded and compared pairwise per model (a seeded sample)")
    repeat: int = Field(4, ge=0, description="rubric verdicts asked twice for repeat consistency")
    verbosity: int = Field(4, ge=0, description="verbosity probes (reference vs the same answer padded)")
    gold: str = Field("labels/judge-gold.jsonl", description="hand-labelled pairwise items, relative to the project")
    gold_limit: int = Field(0, ge=0, description="gold items judged; 0 = all")
    kappa_min: float = Field(0.4, ge=-1.0, le=1.0, description="below this Cohen's kappa the judge is unreliable")
    max_tokens: int = Field(160, ge=32, le=2048)


class EvalSection(Section):
    models: list[str] = Field(default_factory=list, description="served names to compare, the first is the "
                                                                "reference; [] = base + this project's adapter")
    adapters: dict[str, str] = Field(default_factory=dict, description="extra adapters the embedded server loads, "
                                                                       "name: path")
    contexts: list[Literal["gold", "retrieved"]] = Field(default_factory=lambda: ["gold", "retrieved"])
    retrieval_k: int = Field(2, ge=1, le=10, description="chunks in the user turn in retrieved mode (hit@k)")
    retrieved_limit: int = Field(24, ge=0, description="answerable items evaluated in retrieved mode "
                                                       "(a seeded sample); 0 = all")
    max_tokens: int = Field(0, ge=0, description="0 = 2 x the 95th percentile of reference answer tokens")
    concurrency: int = Field(32, ge=1, le=256, description="requests in flight (the embedded server gets as "
                                                            "many KV-cache slots)")
    resamples: int = Field(10_000, ge=100, description="paired bootstrap resamples")
    seed: int = 0
    quick_limit: int = Field(8, ge=1, description="eval items under --quick")
    gate: Literal["champion", "challenger"] = Field(
        "champion", description="--promote: a better candidate becomes 'champion' at once, or 'challenger' (MLflow "
                                "alias) that gets a small share of live traffic through the gateway first")
    gateway_alias: str | None = Field(None, description="with gate: challenger, the gateway alias (gateway.aliases) "
                                                        "whose split the challenger joins")
    challenger_weight: float = Field(0.1, gt=0.0, lt=1.0, description="share of the alias's traffic the challenger "
                                                                      "gets at first ('sovllm ab report' decides "
                                                                      "the rest)")
    judge: EvalJudgeSection = Field(default_factory=EvalJudgeSection)


class PeerSection(Section):
    """Pods a workflow pod may reach, for its NetworkPolicy: a namespace and pod labels, on one port."""

    namespace: str
    pod_labels: dict[str, str] = Field(default_factory=dict)
    port: int = Field(..., ge=1, le=65535)


class ObjectStoreSection(Section):
    endpoint: str = Field("minio.minio.svc.cluster.local:9000", description="the in-cluster S3-compatible store, "
                                                                            "host:port")
    bucket: str = "sovllm"
    insecure: bool = Field(False, description="plain HTTP to the store (an in-cluster MinIO without TLS)")
    credentials_secret: str = Field("sovllm-object-store", description="Secret holding the access and secret key")
    access_key_key: str = "accessKey"
    secret_key_key: str = "secretKey"
    prefix: str | None = Field(None, description="key prefix of the project's artifacts; default sovllm/<project>")


class MonitoringSection(Section):
    """Alert thresholds (`sovllm render k8s`, `sovllm render rules`) and where pipeline stages push metrics."""

    pushgateway: str | None = Field(None, description="Prometheus Pushgateway URL (its host in egress.allow); "
                                                      "each stage of sovllm run pushes sovllm:pipeline_* there")
    queue_waiting: int = Field(10, ge=1, description="alert: more requests waiting than this for 5 minutes")
    ttft_p95_seconds: float = Field(2.0, gt=0, description="alert: time to first token p95 above this for 10 minutes")
    error_rate: float = Field(0.05, gt=0, le=1, description="alert: share of 5xx responses above this for 5 minutes")
    kv_cache_usage: float = Field(0.9, gt=0, le=1, description="alert: KV cache fuller than this for 10 minutes")


def _pinned_tag(value: str | None) -> str | None:
    if value is not None and (not value.strip() or value.strip() == "latest"):
        raise ValueError("the image must be pinned to a version, not 'latest'")
    return value


def _repository_only(value: str, tag_key: str) -> str:
    if "@" in value or ":" in value.rsplit("/", 1)[-1]:
        raise ValueError(f"give the repository only (e.g. registry.internal/sovllm); the tag is {tag_key}")
    return value


class ServingSection(Section):
    """How the model is served on the cluster (`sovllm render k8s`)."""

    engine: Literal["vllm", "sovllm"] = Field("vllm", description="vllm: GPU nodes; sovllm: sovllm serve on CPU nodes")
    vllm_image: str = Field("registry.internal/sovllm-vllm", description="vLLM with sovllm's plugin (docker/vllm."
                                                                       "Dockerfile), repository only")
    vllm_image_tag: str = Field("0.32.0", description="pinned; the vLLM version the rendered flags were tested with")
    replicas: int = Field(2, ge=1, le=100, description="at least this many (the PodDisruptionBudget keeps one up)")
    max_replicas: int = Field(4, ge=1, le=100)
    queue_target: int = Field(4, ge=1, description="vllm:num_requests_waiting per replica above which the "
                                                   "autoscaler adds one")
    gpus: int = Field(1, ge=0, le=16, description="GPUs per vLLM replica (tensor parallel size)")
    cpu: str = "4"
    memory: str = "24Gi"
    dtype: str = Field("auto", description="vLLM --dtype (auto: the model's; sovllm serve always fp32)")
    max_model_len: int = Field(4096, ge=256)
    max_loras: int = Field(4, ge=1, le=64, description="adapters in one batch (vLLM --max-loras)")
    max_lora_rank: int = Field(16, ge=1, le=512)
    max_cpu_loras: int = Field(16, ge=1, description="adapters kept in host memory (vLLM --max-cpu-loras)")
    base_model_key: str | None = Field(None, description="object key of the base model .tgz; default "
                                                         "models/<model.base>.tgz")
    adapters: dict[str, str] = Field(default_factory=dict, description="served name: object key of its .tgz; "
                                                                       "{} = the project's adapter from the pipeline")
    storage: str = Field("20Gi", description="the models volume (PVC) per replica")
    storage_class: str | None = None
    api_key_secret: str = Field("sovllm-api-key", description="Secret with the API key clients send")
    api_key_key: str = "apiKey"
    port: int = Field(8000, ge=1, le=65535)
    clients: list[dict[str, str]] = Field(
        default_factory=lambda: [{"app.kubernetes.io/name": "sovllm-gateway"},
                                 {"app.kubernetes.io/part-of": "sovllm", "sovllm.io/component": "pipeline"}],
        description="pod labels (in this namespace) that may call the server: the gateway and the pipeline")
    prometheus_peer: PeerSection = Field(
        default_factory=lambda: PeerSection(namespace="monitoring",
                                            pod_labels={"app.kubernetes.io/name": "prometheus"}, port=9090),
        description="the Prometheus that scrapes the server (its port is not used)")

    _pinned = field_validator("vllm_image_tag")(lambda cls, value: _pinned_tag(value))
    _no_tag = field_validator("vllm_image")(lambda cls, value: _repository_only(value, "vllm_image_tag"))


class GatewayClientSection(Section):
    """Pods that may call the gateway (its NetworkPolicy): the pods with `pod_labels` in the namespaces with
    `namespace_labels`; namespace labels alone admit every pod there, pod labels alone mean the gateway's own
    namespace."""

    namespace_labels: dict[str, str] = Field(default_factory=dict)
    pod_labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _some_labels(self) -> "GatewayClientSection":
        if not self.namespace_labels and not self.pod_labels:
            raise ValueError("give namespace_labels, pod_labels or both: an empty client would admit every pod")
        return self


class GatewayDeploySection(Section):
    """How `sovllm gateway serve` runs on the cluster (`sovllm render k8s`, when gateway.tenants is set)."""

    replicas: int = Field(2, ge=1, le=100, description="with a shared usage database (gateway.usage_database_env "
                                                       "or usage_database); the default SQLite store always gets 1")
    cpu: str = "1"
    memory: str = "1Gi"
    port: int = Field(8080, ge=1, le=65535)
    keys_secret: str = Field("sovllm-gateway-keys", description="Secret with the tenants' keys: item "
                                                                "tenant.<tenant> (one key per line) for a tenant's "
                                                                "file keys, admin.keys for file admin_keys, and an "
                                                                "item named like the variable for each env key")
    database_secret: str = Field("sovllm-gateway-database", description="Secret with the usage database URL (for "
                                                                        "gateway.usage_database_env)")
    database_key: str = "url"
    storage: str = Field("1Gi", description="the SQLite usage store's volume (PVC), without a database URL")
    storage_class: str | None = None
    clients: list[GatewayClientSection] = Field(
        default_factory=lambda: [GatewayClientSection(namespace_labels={"sovllm.io/gateway-client": "true"})],
        min_length=1, description="who may call the gateway; default: every pod in namespaces labelled "
                                  "sovllm.io/gateway-client=true")
    database_peer: PeerSection = Field(
        default_factory=lambda: PeerSection(namespace="postgres", port=5432),
        description="where the usage database runs (egress, only with a database URL); its Services' names "
                    "*.<namespace>.svc are added to the gateway's egress.allow")


class ClusterSection(Section):
    """How the pipeline and the server render for a Kubernetes cluster (`sovllm render argo|k8s`)."""

    namespace: str = "sovllm"
    image: str = Field("registry.internal/sovllm", description="the sovllm image repository (no tag)")
    image_tag: str | None = Field(None, description="default: this sovllm's version; never 'latest'")
    service_account: str = "sovllm-pipeline"
    synth_shards: int = Field(2, ge=1, le=64, description="synth steps that run side by side (synth --shard K/N)")
    retries: int = Field(2, ge=0, le=10, description="retries of a failed step")
    retry_backoff: str = Field("30s", description="first wait before a retry; doubles each time, at most 10m")
    gpu_node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    gpu_tolerations: list[dict[str, str]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    object_store: ObjectStoreSection = Field(default_factory=ObjectStoreSection)
    object_store_peer: PeerSection = Field(
        default_factory=lambda: PeerSection(namespace="minio", pod_labels={"app": "minio"}, port=9000))
    llm_peer: PeerSection = Field(
        default_factory=lambda: PeerSection(namespace="sovllm", pod_labels={"app.kubernetes.io/name": "vllm"},
                                            port=8000),
        description="where the workflow's LLM endpoint (endpoint.base_url) runs")
    mlflow_peer: PeerSection = Field(
        default_factory=lambda: PeerSection(namespace="mlflow", pod_labels={"app": "mlflow"}, port=5000))
    pushgateway_peer: PeerSection = Field(
        default_factory=lambda: PeerSection(namespace="monitoring",
                                            pod_labels={"app.kubernetes.io/name": "prometheus-pushgateway"}, port=9091),
        description="the Pushgateway the workflow's steps push to (only when monitoring.pushgateway is set)")
    kubernetes_api_cidr: str = Field("10.96.0.1/32", description="the API server's address (for the workflow "
                                                                 "pods' egress policy)")
    kubernetes_api_port: int = 443
    serving: ServingSection = Field(default_factory=ServingSection)
    gateway: GatewayDeploySection = Field(default_factory=GatewayDeploySection)

    _pinned = field_validator("image_tag")(lambda cls, value: _pinned_tag(value))
    _no_tag = field_validator("image")(lambda cls, value: _repository_only(value, "image_tag"))


class KeySource(Section):
    """One API key or a set of keys: its sha256 (never the key itself), or a file or environment variable
    holding keys, one per line (a mounted Secret). Files are re-read while the gateway runs, so a key is
    rotated by adding the new one, moving clients over, then removing the old one."""

    sha256: str | None = Field(None, description="hex sha256 of the key (sovllm gateway hash-key prints it)")
    file: str | None = Field(None, description="file with one key per line, relative to the project")
    env: str | None = Field(None, description="environment variable with one key (or several, one per line)")

    @model_validator(mode="after")
    def _exactly_one(self) -> "KeySource":
        given = [name for name in ("sha256", "file", "env") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError("give exactly one of sha256, file or env")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError("sha256 must be 64 lowercase hex digits (sovllm gateway hash-key prints it)")
        return self


class TenantLimits(Section):
    requests_per_s: float = Field(0, ge=0, description="sustained requests per second (bursts up to one second's "
                                                       "worth); 0 = unlimited")
    tokens_per_min: int = Field(0, ge=0, description="prompt + completion tokens in any 60 s window; 0 = unlimited")
    concurrency: int = Field(0, ge=0, description="requests in flight at once; 0 = unlimited")


class TenantSection(Section):
    keys: list[KeySource] = Field(..., min_length=1)
    models: list[str] = Field(..., min_length=1, description="what the tenant may call: aliases, adapter names "
                                                             "and the base model's served name")
    limits: TenantLimits = Field(default_factory=TenantLimits)


class AliasSection(Section):
    routes: dict[str, float] = Field(..., min_length=1, description="adapter (or base model) name: weight; "
                                                                    "several = an A/B split")
    registered_model: str | None = Field(None, description="MLflow registered model whose champion / challenger "
                                                           "aliases 'sovllm ab report --apply' moves")

    @field_validator("routes")
    @classmethod
    def _weights(cls, routes: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in routes.values()) or sum(routes.values()) <= 0:
            raise ValueError("weights must be >= 0 and add up to more than 0")
        return routes


class UpstreamSection(Section):
    url: str = Field(..., description="OpenAI-compatible base URL, e.g. http://vllm:8000/v1")
    api_key_env: str | None = Field(None, description="environment variable with the upstream's API key")
    api_key_file: str | None = Field(None, description="file with the upstream's API key")

    _http = field_validator("url")(EndpointSection._http_url.__func__)


class GatewaySection(Section):
    """`sovllm gateway`: one OpenAI-compatible entry point for many tenants in front of vLLM or sovllm serve."""

    upstreams: list[UpstreamSection] = Field(
        default_factory=lambda: [UpstreamSection(url="http://127.0.0.1:8000/v1")],
        description="servers requests are spread over (health-checked, round robin)")
    tenants: dict[str, TenantSection] = Field(default_factory=dict)
    aliases: dict[str, AliasSection] = Field(default_factory=dict)
    admin_keys: list[KeySource] = Field(default_factory=list, description="keys that may load and unload adapters "
                                                                          "and call every model")
    adapters: dict[str, str] = Field(default_factory=dict, description="adapter name: the path its upstream loads "
                                                                       "it from, for a runtime load when an upstream "
                                                                       "lacks a routed adapter")
    user_header: str = Field("x-sovllm-user", description="header naming the end user: A/B variants stick to it "
                                                          "(else the request's 'user' field)")
    usage_database: str | None = Field(None, description="SQLAlchemy URL of the usage and feedback store; default "
                                                          "sqlite in <output>/gateway/usage.db; postgresql://... "
                                                          "for a shared one")
    usage_database_env: str | None = Field(None, description="environment variable holding the database URL "
                                                              "instead (a Secret: the URL carries the password)")
    health_interval_s: float = Field(5.0, gt=0, description="seconds between upstream health checks")
    timeout_s: float = Field(600.0, gt=0, description="upstream read timeout")
    max_body_bytes: int = Field(4 * 2**20, ge=1024)

    @model_validator(mode="after")
    def _names_resolve(self) -> "GatewaySection":
        for alias, spec in self.aliases.items():
            if alias in self.adapters:
                raise ValueError(f"alias '{alias}' is also an adapter name; give it another name")
        for tenant, spec in self.tenants.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", tenant):
                raise ValueError(f"tenant name '{tenant}': use letters, digits, '.', '_' or '-' (at most 64)")
        return self


class Config(Section):
    """The whole `sovllm.yaml`."""

    version: int = Field(1, ge=1, le=1)
    project: ProjectSection = Field(default_factory=ProjectSection)
    model: ModelSection = Field(default_factory=ModelSection)
    prompt: PromptSection = Field(default_factory=PromptSection)
    egress: EgressSection = Field(default_factory=EgressSection)
    endpoint: EndpointSection = Field(default_factory=EndpointSection)
    ingest: IngestSection = Field(default_factory=IngestSection)
    synth: SynthSection = Field(default_factory=SynthSection)
    curate: CurateSection = Field(default_factory=CurateSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    monitoring: MonitoringSection = Field(default_factory=MonitoringSection)
    gateway: GatewaySection = Field(default_factory=GatewaySection)

    def endpoints(self) -> dict[str, str]:
        """Configured remote endpoints by config key (URLs sovllm will contact)."""
        tracking = self.train.tracking.uri or ""
        urls = {"endpoint.base_url": self.endpoint.base_url, "curate.judge.base_url": self.curate.judge.base_url,
                "train.tracking.uri": tracking if urlsplit(tracking).scheme in ("http", "https") else None,
                "monitoring.pushgateway": self.monitoring.pushgateway}
        urls.update({f"gateway.upstreams[{i}].url": u.url for i, u in enumerate(self.gateway.upstreams)
                     if self.gateway.tenants})
        database = urlsplit(self.gateway.usage_database or "")
        if database.hostname:
            urls["gateway.usage_database"] = f"{database.scheme}://{database.hostname}"
        return {key: url for key, url in urls.items() if url}

    def endpoints_outside_allow_list(self) -> dict[str, str]:
        """Configured endpoints whose host the egress guard would refuse, by config key."""
        policy = Policy(self.egress.allow)
        return {k: url for k, url in self.endpoints().items() if not policy.allows(urlsplit(url).hostname or "")}

    def hash(self) -> str:
        """sha256 of the canonical JSON form, for stage skipping."""
        return config_hash(self.model_dump(mode="json"))


def config_hash(data) -> str:
    """sha256 of `data` as canonical JSON (sorted keys, no whitespace)."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# --- loading -----------------------------------------------------------------------------------


def _key_lines(text: str) -> dict[tuple, int]:
    """Map each key path in the YAML text to its 1-based line number."""
    lines: dict[tuple, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*path, key_node.value)
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*path, i)] = item.start_mark.line + 1
                walk(item, (*path, i))

    if root is not None:
        walk(root, ())
    return lines


def _model_at(path: tuple) -> type[BaseModel] | None:
    """The section model that owns the keys at `path` (None where the path leaves the models)."""
    model: type[BaseModel] = Config
    for part in path:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *typing.get_args(annotation)]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def _describe(err: dict) -> str:
    loc = tuple(err["loc"])
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        owner = _model_at(loc[:-1])
        valid = sorted(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(valid)}"
        return f"{dotted}: unknown key; {hint}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{dotted}: {msg} (got {err['input']!r})" if err["type"] != "missing" else f"{dotted}: {msg}"


def _apply_override(data: dict, override: str) -> tuple:
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. --set ingest.chunk_size=256")
    key, raw = override.split("=", 1)
    parts = tuple(p for p in key.strip().split(".") if p)
    if not parts:
        raise ConfigError(f"--set {override!r}: the key is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {override!r}: the value is not valid YAML ({exc.problem})") from None
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override!r}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value
    return parts


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load and validate a `sovllm.yaml` (or defaults when `path` is None), applying `--set` overrides.

    Raises ConfigError listing every problem, each with its file and line (or `--set`).
    """
    text, data, where = "", {}, "defaults"
    if path is not None:
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_FILE
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file", hint="create a project with 'sovllm init DIR'")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read ({exc})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, found {type(data).__name__}")
    overridden = {_apply_override(data, o) for o in overrides}
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = _key_lines(text)
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            if any(loc[: len(o)] == o for o in overridden):
                source = "--set"
            else:
                line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
                source = f"{where}:{line}" if line else where
            problems.append(f"{source}: {_describe(err)}")
        noun = "problem" if len(problems) == 1 else "problems"
        raise ConfigError(f"{where}: {len(problems)} config {noun}", problems=problems) from None


def project_root(directory: str | Path) -> Path:
    """The project folder for `directory`, which must contain `sovllm.yaml`."""
    root = Path(directory).resolve()
    if not (root / CONFIG_FILE).is_file():
        raise ConfigError(f"{root}: no {CONFIG_FILE} here", hint=f"run 'sovllm init {directory}' to create a project")
    return root
