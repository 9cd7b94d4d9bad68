"""Signed webhooks to the user's endpoint (Standard Webhooks, the user's secret)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from temporalio import activity

from workflows.models import UserEventType


class UserWebhookInput(BaseModel):
    run_id: str
    url: str
    secret: str = Field(repr=False)
    msg_id: str
    event_type: UserEventType
    payload: dict[str, Any]


class NotifyActivities:
    def __init__(self, settings) -> None:  # type: ignore[no-untyped-def]
        self.settings = settings

    @activity.defn
    async def send_user_webhook(self, input: UserWebhookInput) -> None:
        raise NotImplementedError
