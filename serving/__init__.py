"""Serving side of tsimcne: image decoding, preprocessing and the bundle contract (no torch)."""
