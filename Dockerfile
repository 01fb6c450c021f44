# GPU worker: a CUDA PyTorch base image with the pipeline installed; runs the Prefect flow.
#   docker build -t rlhf-worker .
#   docker run --gpus all -v "$PWD:/work" -w /work rlhf-worker
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    DO_NOT_TRACK=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    DVC_NO_ANALYTICS=1

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/rlhf
COPY . .
# torch comes from the base image (CUDA build); everything else is pinned by the constraints file.
RUN grep -v '^torch' requirements/constraints.txt > /tmp/constraints.txt \
    && pip install -c /tmp/constraints.txt -e .

WORKDIR /work
CMD ["python", "-m", "flows.pipeline", "--project-dir", "/work"]
