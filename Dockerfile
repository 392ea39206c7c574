# The director image: `docker build -t ghcr.io/kubelvs/kubelvs:0.1.0 .`
FROM python:3.11-slim
COPY pyproject.toml README.md /src/
COPY operator /src/operator
RUN pip install --no-cache-dir /src && rm -rf /src
ENTRYPOINT ["kubelvs"]
