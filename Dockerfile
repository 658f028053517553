# One image for every Parley service; compose.yaml picks the service with `python -m <package>`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# README.m[d]: copied when present (pyproject names it), without failing the build when it is not.
COPY pyproject.toml README.m[d] ./
COPY events ./events
COPY command_api ./command_api
COPY projector ./projector
COPY realtime_fanout ./realtime_fanout
COPY servicekit ./servicekit
COPY devstack ./devstack
# A regular (non-editable) install without the dev extras; the sources are not needed afterwards.
RUN pip install . \
    && rm -rf /src \
    && useradd --create-home --uid 10001 --user-group parley

USER parley
WORKDIR /home/parley
EXPOSE 8000 8001 8002
CMD ["python", "-m", "command_api"]
