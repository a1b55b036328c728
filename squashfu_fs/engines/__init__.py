"""The external engines squashfu drives: subprocess running, rsync, mksquashfs and kernel mounts."""
