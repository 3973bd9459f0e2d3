"""Train (pixel level): the series-model functions of :mod:`cropmap.pipeline.levels.series_models`, under
the names the pixel stages, ``cropmap train`` and the benchmarks import them by."""

from cropmap.pipeline.levels.series_models import (  # noqa: F401  (re-exported)
    ARCHITECTURE_EXCLUDE,
    PRESTO_MODELS,
    as_series,
    class_table,
    data_options_for,
    default_split,
    encode_labels,
    epoch_logger,
    load_model_dir,
    pretrained_model_name,
    subsample_labels,
    train_model,
    work_dir_for,
    write_directory,
)
