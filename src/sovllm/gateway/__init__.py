"""`sovllm gateway`: a multi-tenant OpenAI-compatible proxy in front of vLLM or `sovllm serve`."""
