"""eigenkv.engines: engine directories and the runtime that drives them."""

if __name__ == "engines":  # imported by its bare folder name from the repo root
    raise ImportError("import eigenkv.engines, not engines: the bare name creates a second module object")
