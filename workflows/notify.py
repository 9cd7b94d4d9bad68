"""Delivers one user webhook apart from the run it reports on, on a bounded schedule.

Each attempt is one POST. A receiver that answers 408, 429, 5xx or not at all is tried again
after the next delay of DELIVERY_SCHEDULE (or its Retry-After, if longer); after the last
attempt, or at once for an answer no retry can change (4xx, a refused address), the delivery
gives up. Either way the child completes with what happened (`WebhookDelivery`): a receiver that
is down never makes a run's webhooks pile up as running or failed workflows. The child's memo
`delivery` says where it stands, so `loratrain status` reads every delivery of a run with one
listing.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from activities.notify import NotifyActivities, UserWebhookInput

    from .models import WebhookDelivery

# The first schedule: one activity retried with backoff for up to a day. Children started
# before the bounded schedule replay on it.
DELIVERY_WINDOW = timedelta(hours=24)
DELIVERY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=5),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=30),
)
BOUNDED_SCHEDULE = "webhook-bounded-schedule"
# Delays before each attempt (the Standard Webhooks reference schedule, trimmed to a day):
# 8 attempts over about 20.6 hours.
DELIVERY_SCHEDULE = [
    timedelta(0),
    timedelta(seconds=5),
    timedelta(minutes=1),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=2),
    timedelta(hours=6),
    timedelta(hours=12),
]
ONE_ATTEMPT = RetryPolicy(maximum_attempts=1)
MEMO_KEY = "delivery"


@workflow.defn(name="UserWebhookWorkflow")
class UserWebhookWorkflow:
    """Started as an abandoned child, so a user endpoint that is down never delays the run."""

    @workflow.run
    async def run(self, message: UserWebhookInput) -> WebhookDelivery | None:
        if not workflow.patched(BOUNDED_SCHEDULE):
            await workflow.execute_activity_method(
                NotifyActivities.send_user_webhook,
                message,
                start_to_close_timeout=timedelta(seconds=60),
                schedule_to_close_timeout=DELIVERY_WINDOW,
                retry_policy=DELIVERY_RETRY,
            )
            return None
        delivery = WebhookDelivery(event_type=message.event_type, state="delivering")
        for number, delay in enumerate(DELIVERY_SCHEDULE, start=1):
            wait = max(delay, delivery.retry_after or timedelta(0))
            if wait:
                delivery.next_attempt_at = workflow.now() + wait
                self._publish(delivery)
                await workflow.sleep(wait, summary=f"wait before attempt {number}")
            delivery.attempts, delivery.next_attempt_at = number, None
            try:
                await workflow.execute_activity_method(
                    NotifyActivities.send_user_webhook,
                    message,
                    start_to_close_timeout=timedelta(seconds=60),
                    retry_policy=ONE_ATTEMPT,
                    summary=f"attempt {number} of {len(DELIVERY_SCHEDULE)}",
                )
            except ActivityError as e:
                if is_cancelled_exception(e):
                    raise  # an operator cancelled the delivery: not the receiver's answer
                cause = e.cause
                delivery.last_error = (
                    cause.message if isinstance(cause, ApplicationError) else str(e)
                )
                delivery.retry_after = (
                    cause.next_retry_delay if isinstance(cause, ApplicationError) else None
                )
                if isinstance(cause, ApplicationError) and cause.non_retryable:
                    delivery.state = "refused"
                    break
                delivery.state = "failing"
                continue
            delivery.state = "delivered"
            break
        else:
            delivery.state = "gave_up"
        delivery.retry_after = None
        self._publish(delivery)
        return delivery

    @staticmethod
    def _publish(delivery: WebhookDelivery) -> None:
        workflow.upsert_memo({MEMO_KEY: delivery.model_dump(mode="json", exclude_none=True)})
