"""Delivers one user webhook, with retries for up to 24 hours, apart from the run it reports on."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.notify import NotifyActivities, UserWebhookInput

DELIVERY_WINDOW = timedelta(hours=24)
DELIVERY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=5),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=30),
)


@workflow.defn(name="UserWebhookWorkflow")
class UserWebhookWorkflow:
    """Started as an abandoned child, so a user endpoint that is down never delays the run."""

    @workflow.run
    async def run(self, message: UserWebhookInput) -> None:
        await workflow.execute_activity_method(
            NotifyActivities.send_user_webhook,
            message,
            start_to_close_timeout=timedelta(seconds=60),
            schedule_to_close_timeout=DELIVERY_WINDOW,
            retry_policy=DELIVERY_RETRY,
        )
