"""The one way every process (worker, CLI, tests) connects to Temporal.

Kept apart from worker.py so client commands connect without importing the
worker's activities (litellm alone costs seconds of CPU to import).
"""

from __future__ import annotations

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from activities.settings import Settings

__all__ = ["connect"]


async def connect(settings: Settings) -> Client:
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
    )
