"""Re-encode the WorldCereal demo archives with lossless compression (run once by maintainers).

Usage: python regions/data/vendor_demo.py ../shared/data/worldcereal/patches regions/data/demo

Keeps the archive layout (one folder per location, the same file names, variables, dtypes,
fill values and attributes, copied value for value with netCDF4) and only adds zlib+shuffle
compression, so the `local` ingest source reads the vendored copy and the original export
identically.
"""

import shutil
import sys
from pathlib import Path

import netCDF4


def copy_compressed(src: Path, dst: Path) -> None:
    with netCDF4.Dataset(src) as a, netCDF4.Dataset(dst, "w", format="NETCDF4") as b:
        a.set_auto_maskandscale(False)
        b.setncatts({k: a.getncattr(k) for k in a.ncattrs()})
        for name, dim in a.dimensions.items():
            b.createDimension(name, None if dim.isunlimited() else len(dim))
        for name, var in a.variables.items():
            attrs = {k: var.getncattr(k) for k in var.ncattrs()}
            fill = attrs.pop("_FillValue", None)
            out = b.createVariable(name, var.datatype, var.dimensions, fill_value=fill,
                                   zlib=var.ndim >= 2, complevel=9, shuffle=var.ndim >= 2)
            out.set_auto_maskandscale(False)
            out.setncatts(attrs)
            out[...] = var[...]


def main(src: Path, dst: Path) -> None:
    for nc in sorted(src.glob("*/*.nc")):
        out = dst / nc.parent.name / nc.name
        out.parent.mkdir(parents=True, exist_ok=True)
        copy_compressed(nc, out)
    for extra in ("LICENSE.MIT.txt", "legacy_croptype_legend_wc2eurocrops_map.csv"):
        shutil.copy(src / extra, dst / extra)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
