"""eigenkv.plugins: the eigen::LowRankAttention op (spec, reference math, backends)."""

if __name__ == "plugins":  # imported by its bare folder name from the repo root
    raise ImportError("import eigenkv.plugins, not plugins: the bare name creates a second module object")
