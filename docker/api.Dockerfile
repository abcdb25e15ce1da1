# The API image: FastAPI + Celery producer, no torch (the API never imports it).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY workers ./workers
COPY trainers ./trainers
RUN pip install '.[api]'
RUN useradd --create-home posttrain && mkdir -p /data && chown posttrain /data
USER posttrain
ENV POSTTRAIN_DATA_DIR=/data POSTTRAIN_HOST=0.0.0.0
EXPOSE 8000
HEALTHCHECK CMD python -c "import httpx; httpx.get('http://127.0.0.1:8000/readyz').raise_for_status()"
CMD ["posttrain", "serve", "--host", "0.0.0.0", "--port", "8000"]
