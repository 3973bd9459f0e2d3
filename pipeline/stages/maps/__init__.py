"""Crop maps on disk, by concern: :mod:`.cog` writes the class and confidence Cloud-Optimized
GeoTIFFs and checks them, :mod:`.legend` holds the class table (codes, names, colours) a map carries,
:mod:`.preview` draws PNG previews. The names below are the package's public interface."""

from .cog import CONFIDENCE_NODATA, CONFIDENCE_UNITS_TAG, MapWriter, bigtiff_option, validate_cog
from .legend import CLASS_NODATA, CLASSES_TAG, MapClass, read_class_table
from .preview import write_preview

__all__ = ["MapClass", "MapWriter", "write_preview", "read_class_table", "validate_cog", "bigtiff_option", "CLASSES_TAG",
           "CONFIDENCE_UNITS_TAG", "CLASS_NODATA", "CONFIDENCE_NODATA"]
