# pixelmill image: the same code serves producers, workers and Flower.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md hatch_build.py ./
# The component folders sit beside pixelmill/ (which links to them, README "Layout");
# hatch_build.py copies them into the wheel under pixelmill/.
COPY pixelmill pixelmill
COPY producer producer
COPY worker worker
COPY db db
COPY models models
# [nvml]: nvidia-ml-py, for the GPU utilisation the workers report (README, Metrics).
RUN pip install ".[nvml]"
RUN useradd --create-home --uid 1000 pixelmill && mkdir -p /srv/pixelmill/store \
    && chown -R pixelmill /srv/pixelmill
USER pixelmill
ENTRYPOINT ["pixelmill"]
CMD ["--help"]
