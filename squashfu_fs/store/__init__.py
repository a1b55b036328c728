"""The backup root on disk: its layout, config, history, layer kinds, view names, lock, recovery and
the registry of who reads which layers."""
