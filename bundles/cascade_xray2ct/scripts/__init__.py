"""Scripts of the cascade_xray2ct bundle (importable as ``scripts`` with the bundle root on sys.path)."""
