# Worker image for docker-compose.yml: `rlm worker` (same as `python worker.py`).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # litellm would otherwise download its price list at import.
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    RLM_DATA_DIR=/var/lib/rlm

WORKDIR /app
# Sources only (no .venv, tests or local data), so the image is reproducible.
COPY pyproject.toml README.md worker.py ./
COPY workflows ./workflows
COPY activities ./activities
COPY sandbox_wasm ./sandbox_wasm
COPY cli ./cli
RUN pip install . \
    && useradd --create-home --uid 10001 rlm \
    && mkdir -p /var/lib/rlm \
    && chown rlm /var/lib/rlm

USER rlm
CMD ["rlm", "worker"]
