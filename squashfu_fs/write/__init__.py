"""The write side: creating a root, the nightly backup, the change manifest, the union repairs, retention."""
