# One image for every mlpq role: the one-off migration, the workers, the CLI.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    # One BLAS thread per worker process (prefork children each train one run).
    OMP_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    MKL_NUM_THREADS=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY service ./service
COPY worker ./worker
COPY cli ./cli
COPY migrations ./migrations
RUN pip install ".[monitoring]" \
    && useradd --create-home --uid 1000 mlpq
USER mlpq

# Workers re-enqueue stale runs themselves; migrations run once, in the migrate service.
CMD ["mlpq", "worker"]
