# jethpo image: the CLI with its dependencies, CPU torch by default.
# NOTE: no Docker engine runs on the development machines, so this file has not been built yet.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# CPU wheels of torch by default; pass --build-arg TORCH_INDEX=<a CUDA wheel index> for a GPU image.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/jethpo
ENV PATH=/opt/jethpo/bin:$PATH
RUN pip install --no-cache-dir --upgrade pip \
 && pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch>=2.4,<2.13.1"
COPY pyproject.toml README.md /src/
COPY hpo /src/hpo
COPY models /src/models
COPY storage /src/storage
RUN pip install --no-cache-dir /src

FROM ${BASE_IMAGE}
COPY --from=build /opt/jethpo /opt/jethpo
ENV PATH=/opt/jethpo/bin:$PATH
RUN useradd --create-home --uid 1000 jethpo && mkdir -p /data && chown jethpo /data
USER jethpo
WORKDIR /data
ENTRYPOINT ["jethpo"]
CMD ["--help"]
