"""The client-facing side: Segment's HTTP API, answered the way Segment's SDKs expect."""
