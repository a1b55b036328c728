"""The read side: the time-travel tree and its FUSE adapter, the mount daemon, roll-back, restore, reports."""
