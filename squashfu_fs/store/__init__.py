"""The backup root on disk: its layout, config, history, layer kinds, view names, lock, recovery, the
registry of who reads which layers, and the one way a command opens a root (:mod:`.opening`)."""
