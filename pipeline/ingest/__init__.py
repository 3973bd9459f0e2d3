"""Ingestion sources: `local` (exported archives such as the demo site)."""
