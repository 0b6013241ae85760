"""Scripts of the slice_interp_ldm bundle (importable as ``scripts`` once the bundle root is on sys.path)."""
