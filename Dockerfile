# pixelmill image: the same code serves producers, workers and Flower.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
# pixelmill/ holds links to the component folders (README, "Layout"): COPY keeps them as
# links, so the folders they point at are copied too; building the wheel follows them.
COPY pixelmill pixelmill
COPY producer producer
COPY worker worker
COPY db db
COPY models models
RUN pip install .
RUN useradd --create-home --uid 1000 pixelmill && mkdir -p /srv/pixelmill/store \
    && chown -R pixelmill /srv/pixelmill
USER pixelmill
ENTRYPOINT ["pixelmill"]
CMD ["--help"]
