"""sovllm: a self-hosted LLM fine-tuning stack.

Documents become chunks, synthetic QA pairs, curated splits, a LoRA adapter, a served model and an
evaluation report, with every language-model call going to an endpoint the team runs itself. This
module stays import-light: heavy libraries are imported inside the functions that need them.
"""

__version__ = "0.1.0"
