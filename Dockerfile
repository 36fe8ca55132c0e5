# One image for every vmq service of docker-compose.yml: beat, the monitor worker, host workers, Flower, the
# `vmq` CLI (health checks) and the demo's simulated guests. Health checks are set per service in compose.
#
# Stage 1 builds the wheels (libvirt-python has none on PyPI: it compiles against libvirt-dev).
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt-dev pkg-config gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md beat_schedule.py ./
COPY vmq ./vmq
COPY workers ./workers
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[libvirt,ops]'

# Stage 2: the runtime, without compilers. libvirt0 is the client library; openssh-client lets a host worker
# use VMQ_LIBVIRT_URI=qemu+ssh://... .
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt0 openssh-client \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels 'vmq[libvirt,ops]' && rm -rf /wheels
# Not root: state (beat schedule, Flower's database, generated test nodes) lives in /var/lib/vmq. To reach a
# mounted /var/run/libvirt/libvirt-sock, run the host worker with the socket's group (`group_add:`).
RUN useradd --system --uid 10001 --home-dir /var/lib/vmq --create-home --shell /usr/sbin/nologin vmq
USER vmq
WORKDIR /var/lib/vmq
ENV PYTHONUNBUFFERED=1
# No ENTRYPOINT: each compose service names its command (celery ... / vmq ...).
CMD ["vmq", "--help"]
