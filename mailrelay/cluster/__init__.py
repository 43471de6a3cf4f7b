"""Several relays sharing their limits: counters kept in Redis (redis_counters.py)."""
