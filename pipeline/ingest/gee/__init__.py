"""Source ``gee``: Sentinel-2, Sentinel-1 and CDL from Earth Engine, parcels from local files.

The package is split by kind of work so each part is testable offline:

* :mod:`.tiles`    snapped UTM export tiles and deterministic export names (pure Python);
* :mod:`.builders` site + year + config -> ``ee`` objects and export task configs (pure, no I/O);
* :mod:`.client`   the one interface for side effects (start/poll/list tasks, list/fetch outputs,
  computePixels, getInfo) and its real Earth Engine implementation;
* :mod:`.fake`     a fake client that serves real pixels (the demo site) for tests;
* :mod:`.tasks`    the task manager: skip what exists, pending cap, backoff, retry, split, resume;
* :mod:`.readback` exported GeoTIFF shards and CSV tables -> the cube and sample formats;
* :mod:`.auth`     credentials and project, checked without printing secrets, initialised lazily;
* :mod:`.source`   the ingest and labels stages of a ``source: gee`` site.

``earthengine-api`` is imported only by the modules that build or run expressions, and the
client is initialised only when a gee stage runs.
"""
