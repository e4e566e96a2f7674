"""Log storage behind one small interface (base.LogStore): LMDB on disk, or memory for tests."""
