"""State-store adapters. ``vmq.store.redis.RedisStore`` is the one used in production and tests."""
