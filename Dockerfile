# scratchlm in a container, installed the README's way: the CPU build of torch first, then the project.
#   docker build -t scratchlm .                                # CPU
#   docker build -t scratchlm:cuda --build-arg TORCH=cu124 .  # NVIDIA GPUs (torch's CUDA wheels; the host's driver)
#   docker run --rm -v "$PWD/../shared/data/clean:/data:ro" -v "$PWD/../shared/tokenizers/phi-2:/tokenizer:ro" \
#       -v "$PWD/runs:/runs" scratchlm demo --out /runs/demo
#   docker run --rm -p 8000:8000 -e SCRATCHLM_API_KEY -v ... scratchlm serve --host 0.0.0.0 --corpus /data
FROM python:3.11-slim

ARG TORCH=cpu
# DL3064 reads "TOKENIZER" as a secret token; it is a folder of tokenizer files.
# hadolint ignore=DL3064
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    SCRATCHLM_DATA=/data \
    SCRATCHLM_TOKENIZER=/tokenizer \
    SCRATCHLM_CACHE=/cache

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install "torch==2.13.0" --index-url "https://download.pytorch.org/whl/${TORCH}" \
    && pip install .

RUN useradd --create-home --uid 1000 scratchlm && mkdir -p /cache /runs && chown 1000 /cache /runs
USER 1000
WORKDIR /runs
EXPOSE 8000 8001
ENTRYPOINT ["scratchlm"]
CMD ["demo", "--out", "/runs/demo"]
