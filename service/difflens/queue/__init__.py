"""Job queue: the interface (base.py), Redis Streams (redis_streams.py) and in-process (memory.py)."""
