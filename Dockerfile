# syntax=docker/dockerfile:1
# jethpo image: the jethpo CLI and its dependencies in /opt/jethpo, run as a non-root user.
#
# CPU build of torch by default. A GPU image takes torch from a CUDA wheel index, whose wheels
# bring the CUDA runtime libraries with them, so the base image can stay the same:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t jethpo:cuda .
# BASE_IMAGE also takes a CUDA base image of Ubuntu 22.04, such as
# nvidia/cuda:12.8.1-runtime-ubuntu22.04; Python 3.11 is then installed from Ubuntu's packages.
# NOTE: no Docker engine runs on the development machines, so this file has only been checked
# by tests/test_compose.py and never built.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# Python 3.11: present in python:3.11 images, installed from the distribution in CUDA images.
FROM ${BASE_IMAGE} AS python
ENV DEBIAN_FRONTEND=noninteractive
RUN if ! command -v python3.11 >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# The virtual environment, built with compilers that the runtime image does not carry.
FROM python AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && if [ -x /usr/bin/python3.11 ]; then apt-get install -y --no-install-recommends python3.11-dev; fi \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/jethpo
ENV PATH=/opt/jethpo/bin:$PATH
COPY pyproject.toml README.md /src/
# torch first, from TORCH_INDEX and within the range that pyproject.toml allows; installing the
# project afterwards keeps it, while a plain install from PyPI would fetch the CUDA build.
RUN pip install --no-cache-dir --upgrade pip \
    && torch_requirement="$(python -c 'import tomllib; print(next(d for d in tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"] if d.startswith("torch")))')" \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX}" "${torch_requirement}"
COPY hpo /src/hpo
COPY models /src/models
COPY storage /src/storage
RUN pip install --no-cache-dir /src \
    && jethpo --version

FROM python AS runtime
COPY --from=build /opt/jethpo /opt/jethpo
ENV PATH=/opt/jethpo/bin:$PATH \
    JETHPO_DATA_DIR=/data \
    MPLBACKEND=Agg \
    PYTHONUNBUFFERED=1
RUN useradd --create-home --uid 10001 jethpo \
    && mkdir -p /data \
    && chown jethpo:jethpo /data
USER jethpo
WORKDIR /data
ENTRYPOINT ["jethpo"]
CMD ["--help"]
