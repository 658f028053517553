"""The lifespan every Parley app uses: build its live edges, open them, expose them, close them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

from fastapi import FastAPI


class Managed(Protocol):
    """What a service's edges offer: connect on start, release everything on stop."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...


def services_lifespan(build: Callable[[], Managed]) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """A lifespan that builds `build()`, stores it as `app.state.services`, opens it and always closes it;
    nothing connects before the app starts, so building an app has no side effect."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = build()
        app.state.services = services
        await services.open()
        try:
            yield
        finally:
            await services.close()

    return lifespan
