"""Where a run's user webhooks stand, read from its webhook children with one listing.

Each webhook is its own `UserWebhookWorkflow` child; its memo `delivery` says whether it was
delivered, is failing (with the last error) or gave up. Children started before the memo existed
count by their execution status.
"""

from __future__ import annotations

from pydantic import ValidationError
from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus
from temporalio.service import RPCError

from workflows.models import WebhookDeliveries, WebhookDelivery
from workflows.notify import MEMO_KEY

_MEMO_TELLS = {WorkflowExecutionStatus.RUNNING, WorkflowExecutionStatus.COMPLETED}
_GAVE_UP = {
    WorkflowExecutionStatus.FAILED,
    WorkflowExecutionStatus.TERMINATED,
    WorkflowExecutionStatus.TIMED_OUT,
    WorkflowExecutionStatus.CANCELED,
}


async def webhook_deliveries(
    client: Client, run_id: str, first_execution: str
) -> WebhookDeliveries | None:
    """The deliveries of the run `run_id` whose first execution is `first_execution` (a reused
    id's earlier runs have webhooks of their own); None when it has sent none."""
    query = f"WorkflowType = 'UserWebhookWorkflow' AND ParentWorkflowId = '{run_id}'"
    prefix = f"{run_id}/{first_execution}/webhook/"
    counts = WebhookDeliveries()
    found = False
    try:
        children = [child async for child in client.list_workflows(query)]
    except RPCError:
        return None  # a visibility store that cannot answer this: the rest of status still can
    for child in children:
        if not child.id.startswith(prefix):
            continue
        found = True
        # A child ended from outside (terminated, timed out) counts by that, whatever its memo
        # said; one from before the memo existed counts by its execution status.
        delivery = await _delivery(child) if child.status in _MEMO_TELLS else None
        if delivery is None:
            _count_by_status(counts, child.status)
            continue
        if delivery.state == "delivered":
            counts.sent += 1
        elif delivery.state in ("refused", "gave_up"):
            counts.given_up += 1
        elif delivery.state == "failing":
            counts.failing += 1
        else:
            counts.delivering += 1
        if delivery.state != "delivered" and delivery.last_error and counts.last_error is None:
            # Listed newest first: the most recent webhook's error.
            counts.last_error = f"attempt {delivery.attempts}: {delivery.last_error}"
    return counts if found else None


async def _delivery(child: WorkflowExecution) -> WebhookDelivery | None:
    memo = await child.memo()
    raw = memo.get(MEMO_KEY)
    if raw is None:
        return None
    try:
        return WebhookDelivery.model_validate(raw)
    except ValidationError:
        return None  # a memo this client cannot read: counted by the execution's status


def _count_by_status(counts: WebhookDeliveries, status: WorkflowExecutionStatus | None) -> None:
    if status == WorkflowExecutionStatus.COMPLETED:
        counts.sent += 1
    elif status in _GAVE_UP:
        counts.given_up += 1
    else:
        counts.delivering += 1


def describe(deliveries: WebhookDeliveries) -> str:
    """One line for `loratrain status`: "3 sent, 1 failing (attempt 2: ...)"."""
    parts = [f"{deliveries.sent} sent"]
    if deliveries.delivering:
        parts.append(f"{deliveries.delivering} being delivered")
    if deliveries.failing:
        parts.append(f"{deliveries.failing} failing")
    if deliveries.given_up:
        parts.append(f"{deliveries.given_up} given up")
    line = ", ".join(parts)
    return f"{line} (last error: {deliveries.last_error})" if deliveries.last_error else line
