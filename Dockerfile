# pixelmill image: the same code serves producers, workers and Flower.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# Exactly the lock the tests passed with (docs/contributing.md, "The lock"): every package at its version and
# from the file its sha256 names, nothing resolved anew; GPU utilisation through nvidia-ml-py
# (docs/dashboard.md, "Metrics") is part of it. A layer of its own, so a code change does not reinstall it.
COPY requirements/runtime.txt requirements/runtime.txt
RUN pip install --require-hashes --no-deps -r requirements/runtime.txt
COPY pyproject.toml README.md ./
# All of the code is the one package folder (the top-level db/, models/, ... are links into it),
# built into a wheel by the locked hatchling.
COPY pixelmill pixelmill
RUN pip install --no-deps --no-build-isolation .
RUN useradd --create-home --uid 1000 pixelmill && mkdir -p /srv/pixelmill/store \
    && chown -R pixelmill /srv/pixelmill
USER pixelmill
ENTRYPOINT ["pixelmill"]
CMD ["--help"]
