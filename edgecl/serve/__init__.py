"""The daemon: sockets, the ingest queue, the learner thread, status and metrics."""
