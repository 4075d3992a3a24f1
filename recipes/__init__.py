"""NeMo-Run recipes (run.Partial over the rntp config tree) and the YAML configs of real runs."""
