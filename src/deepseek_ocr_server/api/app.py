"""FastAPI application factory. Knows nothing about tensors: it talks to the ModelManager only."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from ..engine.manager import ModelManager


def create_app(manager: ModelManager, settings: Any = None) -> FastAPI:
    app = FastAPI(title="deepseek-ocr-server")
    app.state.manager = manager
    app.state.settings = settings

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **manager.status().as_dict()}

    return app
