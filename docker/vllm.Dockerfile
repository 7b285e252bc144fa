# vLLM with sovllm's refusal-calibration plugin (sovllm.serve.vllm_plugin), the image
# `sovllm render k8s` runs (cluster.serving.vllm_image, tag = the vLLM version). Built from a checkout:
#   docker build -f docker/vllm.Dockerfile -t registry.internal/sovllm-vllm:0.32.0 .
# sovllm goes in without its dependencies: the plugin uses only the standard library and vLLM.
FROM vllm/vllm-openai:v0.32.0

ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    DO_NOT_TRACK=1 \
    VLLM_NO_USAGE_STATS=1 \
    VLLM_DO_NOT_TRACK=1

COPY pyproject.toml README.md /src/
COPY src /src/src
RUN pip install --no-cache-dir --no-deps /src \
 && python3 -c "import vllm, sovllm.serve.vllm_plugin"

USER 1000
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]
