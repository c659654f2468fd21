# sequence-layers-serving: the streaming server.
#   docker build -t sl-serve .                                  # CPU JAX
#   docker build -t sl-serve:cuda --build-arg JAX_EXTRA=cuda12 .   # GPU JAX
#   docker run -p 50051:50051 -p 8080:8080 sl-serve

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG JAX_EXTRA=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first so code edits reuse this layer: the exact versions and
# hashes of deploy/requirements/serve.lock (`make lock` refreshes it), so
# every build installs what the tests ran against.
COPY deploy/requirements/serve.lock ./
RUN pip install --require-hashes --no-deps -r serve.lock \
    && if [ -n "$JAX_EXTRA" ]; then \
         pip install "jax[$JAX_EXTRA]==$(sed -n 's/^jax==\([^ ]*\).*/\1/p' serve.lock)"; \
       fi
COPY pyproject.toml README.md ./
COPY sequence_layers ./sequence_layers
COPY server ./server
COPY clients ./clients
COPY protos ./protos
COPY loadtests ./loadtests
RUN pip install --no-deps . && python -m compileall -q /opt/venv
# Silero VAD, served by default as `silero-vad`: its official weights imported
# here into an ordinary model directory. The wheel and onnx (which reads the
# weights) are hash-checked by vad.lock; onnx lives in a throwaway folder, so
# neither reaches the runtime stage, and the wheel's torch dependency is never
# installed.
COPY deploy/requirements/vad.lock ./
RUN pip download -q --require-hashes --no-deps --only-binary :all: -r vad.lock -d /tmp/vad \
    && pip install -q --no-deps --target /tmp/onnx /tmp/vad/onnx-*.whl \
    && PYTHONPATH=/tmp/onnx sl-models import silero-vad /opt/models/silero-vad \
         --wheel /tmp/vad/silero_vad-*.whl \
    && rm -rf /tmp/vad /tmp/onnx

FROM ${PYTHON_IMAGE}
# The JAX compilation cache: mount a volume here (compose and Kubernetes do)
# so a restarted container reads its compiled programs back in seconds.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 SL_COMPILE_CACHE_DIR=/var/cache/sl-serve/jax \
    SL_SILERO_VAD_DIR=/opt/models/silero-vad
RUN useradd --system --uid 10001 --create-home --home-dir /home/sl sl \
    && mkdir -p /var/cache/sl-serve && chown sl /var/cache/sl-serve
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/models /opt/models
USER sl
WORKDIR /home/sl
VOLUME /var/cache/sl-serve
EXPOSE 50051 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["sl-serve"]
CMD ["--host", "0.0.0.0", "--grpc-port", "50051", "--http-port", "8080"]
