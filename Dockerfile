# The CloudAI image: CLI, worker, beat and Flower.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY cloudai ./cloudai
COPY workers ./workers
COPY beat ./beat
COPY cli ./cli
RUN pip install . && useradd --create-home --uid 10001 cloudai
# beat, Flower and the CLI run unprivileged; the worker needs the host's Docker socket, which is root on that
# host, so the compose file runs the worker service as root (see README, security notes)
USER cloudai
ENTRYPOINT ["cloudai"]
CMD ["--help"]
