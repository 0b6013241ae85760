"""Scripts of the xray2ctpa_vqgan bundle (importable as ``scripts`` once the bundle root is on sys.path)."""
