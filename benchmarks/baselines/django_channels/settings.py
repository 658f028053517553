"""Django settings of the seed-stack baseline: Channels + channels_redis, nothing else."""

from __future__ import annotations

import os

SECRET_KEY = "benchmark-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["channels"]
ASGI_APPLICATION = "benchmarks.baselines.django_channels.asgi.application"
USE_TZ = True
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        # channels_redis defaults (capacity 100, expiry 60 s): what a seed deployment runs with.
        "CONFIG": {"hosts": [os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")]},
    }
}
LOGGING_CONFIG = None
