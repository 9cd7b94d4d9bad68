# The worker and relay image (`loratrain worker`, `loratrain relay`), used by docker-compose.yml.
# It also runs `python -m gpu_runner`, which the local GPU provider starts inside the worker's
# container; real training needs sd-scripts and a GPU, i.e. the GPU image (gpu_runner/Dockerfile)
# on Vast.ai or a GPU host.
#
#   docker build -t loratrain:local .

FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin loratrain

# The project and its runtime dependencies only: no dev or test extras.
WORKDIR /opt/loratrain
COPY pyproject.toml README.md ./
COPY workflows ./workflows
COPY activities ./activities
COPY common ./common
COPY worker ./worker
COPY relay ./relay
COPY client ./client
COPY cli ./cli
COPY devstack ./devstack
COPY gpu_runner ./gpu_runner
RUN pip install . && rm -rf build *.egg-info

# State (LORA_STATE_DIR, default .loratrain/: local GPU instances) goes under the user's home.
USER loratrain
WORKDIR /home/loratrain

ENTRYPOINT ["loratrain"]
CMD ["worker"]
