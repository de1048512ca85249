# syntax=docker/dockerfile:1
# auditwatch: the operator and the receiver in one small image.
#   docker build -t auditwatch:latest .
# The build stage turns the repository into a wheel and installs it with its dependencies into
# a virtual environment; the final stage copies only that environment (no pip cache, no sources).
# Every dependency ships manylinux wheels for CPython 3.11, so neither stage needs a compiler.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
# operator/auditwatch/data/ holds symlinks to the CRDs (the schema lint and the file loader
# validate against) and to the demo resources; the wheel build copies what they point at.
COPY crds/ crds/
COPY examples/standalone/ examples/standalone/
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/auditwatch \
 && python -m pip --python /opt/auditwatch/bin/python install /wheels/*.whl

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="auditwatch" \
      org.opencontainers.image.description="Kubernetes audit events in, alerts out" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/auditwatch/bin:$PATH
RUN groupadd --system --gid 65532 auditwatch \
 && useradd --system --uid 65532 --gid 65532 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin auditwatch \
 && mkdir /data \
 && chown 65532:65532 /data
COPY --from=build /opt/auditwatch /opt/auditwatch
USER 65532:65532
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
ENTRYPOINT ["auditwatch"]
CMD ["run"]
