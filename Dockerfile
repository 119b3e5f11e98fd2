# fastformer in a container (docs/docker.md): build, then train into a runs directory of the host
#   docker build -t fastformer .
#   mkdir -p runs && docker run --rm --user "$(id -u):$(id -g)" -v "$PWD/runs:/runs" fastformer train --out /runs/demo

# Any Debian-based image whose `python3` (3.10 or later) has venv: the official slim image by default.
ARG BASE=python:3.11-slim

# ---- build: a virtual environment holding fastformer, its dependencies and the plot and datasets extras
FROM ${BASE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/fastformer
COPY . /src
# From PyPI; or, when the build context holds a wheelhouse/ directory (`pip download` on the host:
# what CI does), from those wheels alone, with no network needed inside the build.
RUN if [ -d /src/wheelhouse ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/src/wheelhouse; fi \
 && /opt/fastformer/bin/python -m pip install "/src[plot,datasets]"

# ---- the image: the base, the virtual environment, a user, and the compiled kernels
FROM ${BASE}
# Numba's cache and Matplotlib's font list live outside any home directory and are writable by
# every user, so that `docker run --user UID:GID` (runs owned by the host's user) finds them too.
ENV PATH=/opt/fastformer/bin:$PATH \
    NUMBA_CACHE_DIR=/var/cache/fastformer/numba \
    MPLCONFIGDIR=/var/cache/fastformer/matplotlib \
    PYTHONUNBUFFERED=1
# libgomp: Numba's OpenMP threading layer, fastformer's choice as on the host (kernels/process.py);
# without it Numba falls back to its workqueue
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 --user-group fastformer \
 && mkdir -p /runs /var/cache/fastformer \
 && chown fastformer:fastformer /runs /var/cache/fastformer
COPY --from=build /opt/fastformer /opt/fastformer
USER fastformer
# The Numba kernels compile at their first call (tens of seconds for a training step). One step
# and a few sampled tokens here fill the cache, so that the first `train` and `generate` load
# them instead; a CPU other than the build machine's compiles its own kernels at its first run.
RUN fastformer train --preset tiny --max-steps 1 --out /tmp/warm-up \
 && fastformer generate --checkpoint /tmp/warm-up --prompt "def " --max-new-tokens 8 --seed 0 \
 && python -c "import matplotlib.font_manager" \
 && rm -rf /tmp/warm-up \
 && chmod -R a+rwX /var/cache/fastformer
WORKDIR /runs
VOLUME /runs
ENTRYPOINT ["fastformer"]
CMD ["--help"]
