"""Job queue: the interface (base.py), Redis Streams (redis_streams.py, with its keys and Lua scripts in
redis_lua.py, their typed calls in redis_scripts.py, connecting in redis_conn.py and the workers' cancel channel in
redis_cancel.py) and in-process (memory.py)."""
