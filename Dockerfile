# cropmap: crop-type maps from Sentinel-1/2 time series.
# Build:  docker build -t cropmap .
# Demo:   docker run --rm -v "$PWD/runs:/work/runs" cropmap run --site demo
# GDAL comes with the rasterio wheel (manylinux, GDAL 3.x bundled); the slim Python base only needs
# the runtime libraries those wheels expect.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    GDAL_CACHEMAX=256 GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR

RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cropmap
# CPU torch from PyTorch's CPU index (a CUDA image: use a pytorch/pytorch base instead and skip this line).
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
COPY pyproject.toml README.md __init__.py ./
COPY pipeline ./pipeline
COPY models ./models
COPY regions ./regions
RUN pip install .

# Earth Engine credentials (used by the `gee` source only, never baked into the image):
#   docker run -e GOOGLE_APPLICATION_CREDENTIALS=/secrets/sa.json -e EE_PROJECT=my-project \
#              -v /path/to/sa.json:/secrets/sa.json:ro cropmap run --site iowa --year 2024
WORKDIR /work
RUN useradd --create-home cropmap && chown cropmap /work
USER cropmap
ENTRYPOINT ["cropmap"]
CMD ["--help"]
