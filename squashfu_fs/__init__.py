"""squashfu: incremental SquashFS + overlayfs backups with a time-travel filesystem."""

__version__ = "0.1.0"
