# syntax=docker/dockerfile:1
# CPU image of ssd-serve: target, draft, OpenAI gateway and the draft-pool autoscaler, with the
# embedded default model pair at /app/ssd_models/default (what deploy/k8s/overlays/cpu-demo runs).
#   docker build -t ssd-serve:cpu .
#   docker build --build-arg TORCH_INDEX_URL=<a CPU torch wheel index> -t ssd-serve:cpu .
# torch is pinned (torch==2.13.0 in pyproject.toml). On Linux the default index serves the CUDA
# build of that version; pass a CPU wheel index (your mirror's) as TORCH_INDEX_URL for a small
# CPU-only image. The project itself installs as in the README: `pip install ./ssd-client .` from these files.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    OMP_NUM_THREADS=1

RUN groupadd --system --gid 10001 ssd \
 && useradd --system --uid 10001 --gid ssd --home-dir /tmp --no-create-home ssd

WORKDIR /app
# The pinned torch first, in its own layer (cached while only the sources change).
RUN python -m pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "torch==2.13.0"

COPY . .
# ssd-client (./ssd-client) in the same command, so pip never looks for it on an index.
RUN python -m pip install ./ssd-client ".[openai,k8s]"

# The embedded default pair: from the build context when it is there, else trained here (CPU, small).
RUN if [ ! -f ssd_models/default/target/config.json ] || [ ! -f ssd_models/default/draft/config.json ]; then \
      ssd train-pair --out /app/ssd_models/default --quiet; \
    fi

# `ssd models` / `ssd generate` look for the pair next to the installed packages; the image is read-only for the user.
RUN ln -sfn /app/ssd_models "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/ssd_models" \
 && rm -rf /app/.venv /app/runs /app/out \
 && chmod -R a+rX,go-w /app

USER 10001:10001
EXPOSE 50051 50061 8000 9400
CMD ["ssd", "--help"]
