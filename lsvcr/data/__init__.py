"""Data layer: raw tables (KuaiComt, RecBole, CSV) → validated → PREPARED/ samples (docs/formats.md)."""
