"""One virtual mosaic (VRT) of class maps made in several UTM zones.

A site crossing a UTM zone boundary (Iowa straddles zones 15 and 16 at 90 deg W) is best mapped
as one site per zone: each zone's map is predicted on its own UTM grid, where pixels are square
10 m cells, and is never resampled. For a single state-wide layer :func:`zone_mosaic` writes a
VRT in one CRS (by default the first map's) that references one warped VRT per map in another
CRS. At zone boundaries:

* reprojection uses **nearest neighbour** only (averaging class codes would invent classes);
* where maps overlap (tiles reaching past the zone boundary), each pixel comes from the map
  listed **last** that has data there (class 0 is transparent): maps are ordered by EPSG code, so
  the eastern zone wins its overlap deterministically; elsewhere each pixel comes from its zone;
* the colour table and class tags of the first map are carried over; nodata stays 0.

No pixels are copied: the VRT and the warped VRTs are small XML files next to the output,
readable by GDAL, QGIS or rasterio; ``gdal_translate -of COG`` turns it into one COG if needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from xml.sax.saxutils import escape

import rasterio
import rasterio.shutil
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT

from cropmap.pipeline.errors import DataError
from cropmap.pipeline.fsio import atomic_path, write_text

__all__ = ["zone_mosaic"]


def zone_mosaic(maps: list[Path], out_vrt: Path, *, crs: str | None = None, resolution: float | None = None) -> Path:
    """Write ``out_vrt``: the class maps ``maps`` (any UTM zones) mosaicked in ``crs`` at ``resolution``."""
    maps = [Path(m) for m in maps]
    if not maps:
        raise DataError("no map to mosaic", fix="pass at least one class map")
    info = []
    for m in maps:
        try:
            with rasterio.open(m) as ds:
                info.append((ds.crs.to_epsg() or 0, m, ds.crs, ds.bounds, ds.res[0], ds.dtypes[0], ds.colormap(1) if ds.count else {},
                             ds.tags(1), ds.nodata))
        except rasterio.errors.RasterioIOError as exc:
            raise DataError(f"cannot read map {str(m)!r}: {exc}", fix="pass class maps written by cropmap") from None
    info.sort(key=lambda r: (r[0], str(r[1])))  # eastern zones last: they win overlaps
    dst_crs = CRS.from_user_input(crs) if crs else info[0][2]
    res = float(resolution or info[0][4])
    out_vrt = Path(out_vrt)
    out_vrt.parent.mkdir(parents=True, exist_ok=True)
    sources, bounds = [], []
    for epsg, path, src_crs, b, _, _, _, _, _ in info:
        if src_crs == dst_crs:
            sources.append((path, b))
            bounds.append(b)
            continue
        warped = out_vrt.with_name(f"{out_vrt.stem}.{path.stem}.EPSG{epsg}.vrt")
        with rasterio.open(path) as ds, WarpedVRT(ds, crs=dst_crs, resampling=Resampling.nearest, nodata=0) as vrt:
            wb = vrt.bounds
            with atomic_path(warped) as tmp:
                rasterio.shutil.copy(vrt, tmp, driver="VRT")
                if path.parent == out_vrt.parent:  # name the source relative to the VRT: the folder stays movable
                    absolute = f'<SourceDataset relativeToVRT="0">{escape(str(path))}</SourceDataset>'
                    text = tmp.read_text()
                    if absolute in text:
                        tmp.write_text(text.replace(absolute, f'<SourceDataset relativeToVRT="1">{escape(path.name)}</SourceDataset>'))
        sources.append((warped, wb))
        bounds.append(wb)
    xmin = math.floor(min(b[0] for b in bounds) / res) * res
    ymax = math.ceil(max(b[3] for b in bounds) / res) * res
    xmax = math.ceil(max(b[2] for b in bounds) / res) * res
    ymin = math.floor(min(b[1] for b in bounds) / res) * res
    width, height = int(round((xmax - xmin) / res)), int(round((ymax - ymin) / res))
    first = info[0]
    cmap = "".join(f'<Entry c1="{r}" c2="{g}" c3="{b}" c4="{a}"/>'
                   for r, g, b, a in (first[6].get(i, (0, 0, 0, 0)) for i in range(256)))
    meta = "".join(f'<MDI key="{escape(k)}">{escape(v)}</MDI>' for k, v in first[7].items())
    parts = []
    for path, b in sources:
        with rasterio.open(path) as ds:
            sw, sh = ds.width, ds.height
            sres_x, sres_y = ds.res
        dx, dy = (b[0] - xmin) / res, (ymax - b[3]) / res
        dw, dh = sw * sres_x / res, sh * sres_y / res
        rel = path.name if path.parent == out_vrt.parent else str(path.resolve())
        parts.append(
            f'<ComplexSource><SourceFilename relativeToVRT="{int(path.parent == out_vrt.parent)}">{escape(rel)}</SourceFilename>'
            f'<SourceBand>1</SourceBand><SrcRect xOff="0" yOff="0" xSize="{sw}" ySize="{sh}"/>'
            f'<DstRect xOff="{dx:.6f}" yOff="{dy:.6f}" xSize="{dw:.6f}" ySize="{dh:.6f}"/><NODATA>0</NODATA>'
            f'<ResampleAlg>nearest</ResampleAlg></ComplexSource>')
    xml = (f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">'
           f'<SRS>{escape(dst_crs.to_wkt())}</SRS><GeoTransform>{xmin}, {res}, 0, {ymax}, 0, {-res}</GeoTransform>'
           f'<VRTRasterBand dataType="Byte" band="1"><NoDataValue>0</NoDataValue><ColorInterp>Palette</ColorInterp>'
           f'<ColorTable>{cmap}</ColorTable><Metadata>{meta}</Metadata>{"".join(parts)}</VRTRasterBand></VRTDataset>\n')
    write_text(out_vrt, xml)
    return out_vrt

