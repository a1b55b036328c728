"""Small utilities every layer may use: fd-relative file access, durable writes, the clock, fault points."""
