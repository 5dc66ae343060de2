# kvforge on the CPU: the embedded model served on port 8000.
#   docker build -t kvforge . && docker run --rm -p 8000:8000 kvforge
FROM python:3.11-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . /app
# CPU torch (pinned), kvforge, the embedded model, and the C++ kernels built once
RUN bash scripts/setup.sh
EXPOSE 8000
ENTRYPOINT [".venv/bin/kvforge"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
