"""eigenkv.exporter: calibrate, decompose, choose ranks, fold (and later export)."""

if __name__ == "exporter":  # imported by its bare folder name from the repo root
    raise ImportError("import eigenkv.exporter, not exporter: the bare name creates a second module object")
