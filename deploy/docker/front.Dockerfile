# syntax=docker/dockerfile:1
# The gRPC front (`difflens serve` on the Redis queue): validation, ListModels and the queue. No torch: it reads
# each model's configs and tokenizer files, never its weights.
#   docker build -f deploy/docker/front.Dockerfile -t difflens-front .      (context: the repository root)
# The shipped model rides along at /opt/difflens/models/shapes, so the image serves something as it is.

# Both stages start from the same image: the venv built here links to this stage's /usr/local/bin/python3.11.
FROM python:3.11.14-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY requirements-front.txt requirements.txt ./
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -r requirements-front.txt
# grpcio-tools only generates the stubs: it lives in a venv of its own that the final stage never sees (its pin
# is requirements.txt's).
RUN python -m venv /opt/protoc \
 && /opt/protoc/bin/pip install "$(grep -E '^grpcio-tools==' requirements.txt)"
COPY pyproject.toml README.md ./
COPY proto proto
COPY service service
# The same script `make proto` runs.
COPY deploy/docker/gen-stubs.sh /usr/local/bin/gen-stubs
RUN gen-stubs /opt/protoc/bin/python service/difflens/_gen
# --no-deps: requirements-front.txt already holds every pin; pip check proves it is the package's whole need.
RUN /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/python -c "import difflens._gen.difflens.v1.difflens_pb2_grpc"

FROM python:3.11.14-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 difflens \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/difflens --shell /usr/sbin/nologin \
      difflens
COPY --from=build /opt/venv /opt/venv
COPY models/shapes /opt/difflens/models/shapes
# Numeric, so Kubernetes' runAsNonRoot can tell it is not root without looking the name up.
USER 10001:10001
WORKDIR /home/difflens
# gRPC, then /metrics, /healthz and /readyz
EXPOSE 50051 9090
ENTRYPOINT ["difflens"]
# The Redis URL comes from DIFFLENS_REDIS_URL. --model is explicit: the package's own default (the shipped model
# beside a source checkout) does not exist in an installed package. API keys are required: mount the key file
# (docs/security.md) at /etc/difflens/auth/keys.json, or run the image with --no-auth.
CMD ["serve", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090", "--metrics-host", "0.0.0.0", \
     "--model", "default=/opt/difflens/models/shapes", "--auth-keys", "/etc/difflens/auth/keys.json"]
