"""Pure PyTorch models, baselines and metrics; never imports cropmap.pipeline."""
