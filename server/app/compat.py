"""The front doors' runtime interface over today's `server.runtime.Runtime`.

The doors (`server.frontdoors.bridge.StreamRuntime`) call `infos()` and
`info(name)`; this Runtime names them `list_models()` and `get_model(name)`.
Delete this module once the runtime (issue #16, `server/runtime/`) provides
the interface itself.
"""

from __future__ import annotations

from typing import Any

from server.frontdoors.bridge import StreamHandle
from server.model import ModelInfo
from server.runtime import Runtime


class DoorRuntime:
    """`runtime` seen through `StreamRuntime`."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    @property
    def draining(self) -> bool:
        return self._runtime.draining

    @property
    def ready(self) -> bool:
        return self._runtime.ready

    def open_stream(self, model: str, stream_id: str | None = None) -> StreamHandle:
        return self._runtime.open_stream(model, stream_id)

    def model_state(self, name: str) -> str:
        return self._runtime.model_state(name)

    def record(self, stats: Any) -> None:
        self._runtime.record(stats)

    def infos(self) -> list[ModelInfo]:
        return self._runtime.list_models()

    def info(self, name: str) -> ModelInfo:
        return self._runtime.get_model(name)
