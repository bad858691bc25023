# syntax=docker/dockerfile:1
# CPU image of ssd-serve: target, draft, OpenAI gateway and the draft-pool autoscaler, with the
# embedded default model pair at /app/ssd_models/default (what deploy/k8s/overlays/cpu-demo runs).
#   bash scripts/build_images.sh cpu       (buildah, no daemon; what deploy/ and the README measure)
#   docker build -t ssd-serve:cpu .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t ssd-serve:cpu .
# BASE: any image with python3 >= 3.10 and the venv module (python:3.11-slim, or the Debian base
# scripts/build_images.sh makes from Debian's packages when no registry is reachable).
# torch is pinned (torch==2.13.0 in pyproject.toml). On Linux the default index serves the CUDA
# build of that version (multi-GB); for a CPU-only image give a CPU wheel index (TORCH_INDEX_URL)
# or a directory holding the CPU wheel, mounted into the build (TORCH_FIND_LINKS; build_images.sh
# mounts pip's find-links directory there). The project itself installs as in the README:
# `pip install ./ssd-client .` from these files.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_INDEX_URL=""
ARG TORCH_FIND_LINKS=""
# A CA bundle for pip during the build only (a TLS-inspecting proxy's; build_images.sh mounts the
# host's pip cert here): not kept in the image.
ARG PIP_BUILD_CERT=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    OMP_NUM_THREADS=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# A venv: Debian's own python refuses installs into the system site-packages (PEP 668).
RUN groupadd --system --gid 10001 ssd \
 && useradd --system --uid 10001 --gid ssd --home-dir /tmp --no-create-home ssd \
 && python3 -m venv /opt/venv

WORKDIR /app
# The pinned torch first, in its own layer (cached while only the sources change).
RUN if [ -n "$PIP_BUILD_CERT" ]; then export PIP_CERT="$PIP_BUILD_CERT"; fi \
 && python -m pip install ${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS"} \
      ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "torch==2.13.0" \
 && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

COPY . .
# ssd-client (./ssd-client) in the same command, so pip never looks for it on an index.
RUN if [ -n "$PIP_BUILD_CERT" ]; then export PIP_CERT="$PIP_BUILD_CERT"; fi \
 && python -m pip install ./ssd-client ".[openai,k8s]"

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
