# wasmlog: one image for every role (registry with its log, witness, monitor, mirror).
FROM python:3.11-slim
RUN useradd --create-home --uid 10001 wasmlog
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tlog ./tlog
COPY witness ./witness
COPY registry ./registry
COPY edge ./edge
COPY wasmlog ./wasmlog
RUN pip install --no-cache-dir '.[registry,shared]' && rm -rf /src
USER wasmlog
WORKDIR /data
ENTRYPOINT ["wasmlog", "--log-format", "json"]
CMD ["--help"]
