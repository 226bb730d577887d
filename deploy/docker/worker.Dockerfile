# syntax=docker/dockerfile:1
# A worker (`difflens worker`): takes jobs from the Redis queue and runs the engine (torch).
#   CPU:  docker build -f deploy/docker/worker.Dockerfile -t difflens-worker .
#   CUDA: docker build -f deploy/docker/worker.Dockerfile --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#           -t difflens-worker-cuda .
# One file for both: torch's CUDA wheels bring the CUDA runtime, cuBLAS and cuDNN as pip packages (nvidia-*), and
# the NVIDIA container runtime mounts the node's driver, so an nvidia/cuda base image would only add a second copy
# of those libraries (and a Python we would have to build) for the same result.
# The shipped model rides along at /opt/difflens/models/shapes, so the image serves something as it is.

# Both stages start from the same image: the venv built here links to this stage's /usr/local/bin/python3.11.
FROM python:3.11.14-slim-bookworm AS build
# Which torch 2.13.0 build: the PyTorch index of the cpu wheels (small, no CUDA) or of a CUDA version (cu128, ...).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY requirements-front.txt requirements.txt ./
# torch first, from its own index; requirements.txt's torch==2.13.0 then finds it installed (2.13.0+cpu is 2.13.0).
# grpcio-tools only generates the stubs: it goes to a venv of its own that the final stage never sees.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --index-url "$TORCH_INDEX" torch==2.13.0 \
 && grep -vE '^grpcio-tools==' requirements.txt > requirements-run.txt \
 && /opt/venv/bin/pip install -r requirements-run.txt \
 && python -m venv /opt/protoc \
 && /opt/protoc/bin/pip install "$(grep -E '^grpcio-tools==' requirements.txt)"
COPY pyproject.toml README.md ./
COPY proto proto
COPY service service
# The same script `make proto` runs.
COPY deploy/docker/gen-stubs.sh /usr/local/bin/gen-stubs
RUN gen-stubs /opt/protoc/bin/python service/difflens/_gen
# --no-deps: the requirements files hold every pin; pip check proves they cover what the package declares.
RUN /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/python -c "import torch, difflens._gen.difflens.v1.difflens_pb2_grpc"

FROM python:3.11.14-slim-bookworm
# compute: the CUDA build's libcuda from the node's driver (the runtime mounts only what is asked for). Which GPUs
# a container sees is for the runtime to say (the device plugin, `docker run --gpus`), never "all" from the image.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN groupadd --system --gid 10001 difflens \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/difflens --shell /usr/sbin/nologin \
      difflens
COPY --from=build /opt/venv /opt/venv
COPY models/shapes /opt/difflens/models/shapes
# Numeric, so Kubernetes' runAsNonRoot can tell it is not root without looking the name up.
USER 10001:10001
WORKDIR /home/difflens
# /metrics, /healthz and /readyz
EXPOSE 9090
ENTRYPOINT ["difflens"]
# The Redis URL comes from DIFFLENS_REDIS_URL. --model is explicit: the package's own default (the shipped model
# beside a source checkout) does not exist in an installed package.
CMD ["worker", "--metrics-port", "9090", "--metrics-host", "0.0.0.0", "--model", "default=/opt/difflens/models/shapes"]
