# The director image, multi-stage. The base is an argument:
#   docker build -t ghcr.io/kubelvs/kubelvs:0.1.0 .          (official Python base, PyPI)
#   hack/install/image.sh                                     (daemonless: buildah onto a Debian root
#                                                              filesystem from mmdebstrap, offline wheels)
# The base needs python3 (>= 3.11) with venv, nft (nftables: the VIP port filter) and nsenter
# (util-linux); the official slim image gets nftables from apt below.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
# PIP_OPTIONS and PACKAGE: e.g. "--no-index --find-links /src/wheels" and "kubelvs" to install
# from a wheelhouse in the build context (offline) instead of the source from PyPI's dependencies.
ARG PIP_OPTIONS=""
ARG PACKAGE=/src
COPY . /src
# The kubernetes client is most of the weight: its asyncio twin (kubernetes/aio, 68 MB with bytecode)
# and what only that imports (aiohttp and its helpers) are never imported by kubelvs and go; so do
# pip and setuptools. Bytecode is compiled once here, so that a start on the read-only root
# filesystem does not compile every module again.
RUN python3 -m venv /opt/kubelvs \
    && /opt/kubelvs/bin/pip install --no-cache-dir --no-compile ${PIP_OPTIONS} ${PACKAGE} \
    && /opt/kubelvs/bin/pip uninstall -y -q aiohttp aiohttp-retry aiohappyeyeballs aiosignal yarl multidict \
       frozenlist propcache setuptools pip \
    && rm -rf /opt/kubelvs/lib/python3*/site-packages/kubernetes/aio \
    && python3 -m compileall -q -j 0 /opt/kubelvs/lib

FROM ${BASE}
RUN if ! command -v nft >/dev/null || ! command -v nsenter >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends nftables util-linux \
      && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=build /opt/kubelvs /opt/kubelvs
ENV PATH=/opt/kubelvs/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# uid 0 with only NET_ADMIN and NET_RAW (the chart's securityContext): capabilities apply to root
# only; the pod spec drops every other one and makes the root filesystem read-only.
USER 0
ENTRYPOINT ["kubelvs"]
CMD ["director"]
