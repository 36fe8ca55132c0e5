# One image for every vmq service (beat, monitor worker, host workers, flower, CLI).
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt-dev pkg-config gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/vmq
COPY pyproject.toml README.md beat_schedule.py ./
COPY vmq ./vmq
COPY workers ./workers
RUN pip install --no-cache-dir '.[libvirt]' 'flower>=2.0' \
 && apt-get purge -y gcc libc6-dev && apt-get autoremove -y
RUN useradd --system --home /var/lib/vmq --create-home vmq
USER vmq
WORKDIR /var/lib/vmq
ENTRYPOINT []
