"""The state stream and what consumes it: WAL segments, snapshots, archive targets, restore, backups."""
