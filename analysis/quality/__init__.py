"""Sample quality: image sets (`images`), pinned feature extractors (`features`), FID and friends on features
(`scores`), torch-fidelity's metrics and the results table (`evaluate`), ADM's five metrics (`adm`), and the
statistics that turn per-cell scores into seed-level intervals and verdicts (`stats`).
"""
