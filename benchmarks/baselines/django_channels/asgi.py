"""ASGI entry of the baseline, served by daphne."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.baselines.django_channels.settings")

import django

django.setup()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

from benchmarks.baselines.django_channels.consumer import ChatConsumer  # noqa: E402

application = ProtocolTypeRouter({"websocket": URLRouter([path("ws/chat/", ChatConsumer.as_asgi())])})
