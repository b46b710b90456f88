# The CloudAI image: CLI, master, worker, beat and Flower, installed from the lock (requirements/all.txt).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY requirements/all.txt ./requirements/all.txt
# every package pinned with its hashes, setuptools (which builds CloudAI) included: the image is the lock's
RUN pip install --require-hashes --no-deps -r requirements/all.txt
COPY setup.cfg pyproject.toml README.md ./
COPY cloudai ./cloudai
COPY workers ./workers
COPY beat ./beat
COPY cli ./cli
RUN pip install --no-deps --no-build-isolation . && pip check && useradd --create-home --uid 10001 cloudai
# beat, Flower and the CLI run unprivileged; the worker needs the host's Docker socket, which is root on that
# host, so the compose file runs the worker service as root (see README, security notes)
USER cloudai
ENTRYPOINT ["cloudai"]
CMD ["--help"]
