# lstmd-server image: the server's runtime dependencies and the bundled model, nothing else
# (no torch, no compilers, no tests; the small redis client, so one image serves either session
# store). Build: docker build -t lstmd .
FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/lstmd
COPY pyproject.toml README.md ./
COPY proto proto
COPY server server
COPY client client
COPY export export
RUN /opt/lstmd/bin/pip install --no-cache-dir --disable-pip-version-check ".[server,redis]" \
 && rm -rf /opt/lstmd/lib/python3.11/site-packages/lstmd/server/models

FROM python:3.11-slim
# /snapshots belongs to lstmd: a new volume mounted there (docker-compose.yml) starts with that owner
RUN useradd --system --uid 10001 --no-create-home lstmd \
 && mkdir /snapshots && chown lstmd /snapshots
COPY --from=build /opt/lstmd /opt/lstmd
COPY server/models /models
ENV PATH=/opt/lstmd/bin:$PATH \
    LSTMD_HOST=0.0.0.0 \
    LSTMD_MODELS_DIR=/models \
    LSTMD_HEALTH_PORT=50052 \
    PYTHONUNBUFFERED=1
USER lstmd
EXPOSE 50051 9464
# the plaintext health-only port on loopback: the probe works whatever TLS or client certificates
# the main port asks for (LSTMD_HEALTH_HOST=0.0.0.0 exposes it to outside probers such as a kubelet)
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["lstmd", "health", "--target", "localhost:50052", "--timeout", "3"]
# exec form: lstmd-server is PID 1 and receives SIGTERM itself (graceful shutdown)
ENTRYPOINT ["lstmd-server"]
