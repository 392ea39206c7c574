# The director image: `docker build -t ghcr.io/kubelvs/kubelvs:0.1.0 .`
FROM python:3.11-slim
# nftables: the VIP port filter (kernel/vipfilter.py, one `nft -f -` transaction per change);
# util-linux: nsenter, for a director that programs another network namespace.
RUN apt-get update && apt-get install -y --no-install-recommends nftables util-linux \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /src/
COPY operator /src/operator
RUN pip install --no-cache-dir /src && rm -rf /src
ENTRYPOINT ["kubelvs"]
