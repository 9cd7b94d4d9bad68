"""The run's user webhooks: a queue that survives continue-as-new, delivered by abandoned children.

Each webhook is its own `UserWebhookWorkflow` child (retries for 24 h), so a user endpoint that is
down never delays the run. Child ids and webhook ids carry the run's first execution id, so a run
id reused after the previous run closed never collides with that run's still-retrying children.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel
from temporalio import workflow
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from activities.notify import UserWebhookInput

    from .models import Progress, UserEventType, UserWebhook
    from .notify import UserWebhookWorkflow

PROGRESS_MIN_INTERVAL = timedelta(seconds=30)
PROGRESS_MIN_PERCENT = 5.0


class QueuedWebhook(BaseModel):
    number: int
    event_type: UserEventType
    occurred_at: datetime
    data: dict[str, Any]


class WebhookQueueState(BaseModel):
    """What continue-as-new carries: webhooks not yet handed to a child, and the numbering."""

    queued: list[QueuedWebhook] = []
    numbered: int = 0
    last_progress_at: datetime | None = None
    last_progress_percent: float | None = None


class UserWebhooks:
    def __init__(
        self, webhook: UserWebhook | None, run_id: str, execution: str, state: WebhookQueueState
    ) -> None:
        self._webhook = webhook
        self._run_id = run_id
        self._execution = execution
        self.state = state

    @property
    def idle(self) -> bool:
        return not self.state.queued

    def queue(self, event_type: UserEventType, data: dict[str, Any]) -> None:
        if self._webhook is None or not self._webhook.wants(event_type):
            return
        self.state.numbered += 1
        self.state.queued.append(
            QueuedWebhook(
                number=self.state.numbered,
                event_type=event_type,
                occurred_at=workflow.now(),
                data=data,
            )
        )

    def queue_progress(self, progress: Progress, version: int) -> None:
        """At most every 30 s and 5 % (DESIGN.md, User webhooks)."""
        state, now = self.state, workflow.now()
        if (
            state.last_progress_at is not None
            and state.last_progress_percent is not None
            and (
                now - state.last_progress_at < PROGRESS_MIN_INTERVAL
                or progress.percent - state.last_progress_percent < PROGRESS_MIN_PERCENT
            )
        ):
            return
        state.last_progress_at, state.last_progress_percent = now, progress.percent
        self.queue("training.progress", {**progress.model_dump(mode="json"), "version": version})

    async def deliver_forever(self) -> None:
        """Hands each queued webhook to its own child, in order; never waits for delivery."""
        webhook = self._webhook
        while webhook is not None:
            await workflow.wait_condition(lambda: bool(self.state.queued))
            item = self.state.queued[0]
            try:
                await workflow.start_child_workflow(
                    UserWebhookWorkflow.run,
                    UserWebhookInput(
                        run_id=self._run_id,
                        url=webhook.url,
                        secret=webhook.secret,
                        msg_id=f"{self._run_id}:{self._execution}:{item.number}",
                        event_type=item.event_type,
                        occurred_at=item.occurred_at,
                        payload=item.data,
                    ),
                    id=f"{self._run_id}/{self._execution}/webhook/{item.number}",
                    parent_close_policy=ParentClosePolicy.ABANDON,
                    static_summary=f"{item.event_type} webhook #{item.number}",
                )
            except WorkflowAlreadyStartedError:
                # An earlier execution of this run started it before continuing as new.
                pass
            except Exception:
                # A child that cannot start must not stop the webhooks after it, nor the run.
                workflow.logger.exception(
                    "run %s: webhook #%d (%s) could not be started; skipped",
                    self._run_id,
                    item.number,
                    item.event_type,
                )
            self.state.queued.pop(0)

    async def drain(self, within: timedelta) -> bool:
        """Wait (bounded) until every queued webhook was handed to a child."""
        try:
            await workflow.wait_condition(
                lambda: self.idle, timeout=within, timeout_summary="hand webhooks over"
            )
        except TimeoutError:
            return False
        return True
