"""The status machine: a run's status is derived from the facts it has learned.

Facts only accumulate, so an event that arrives early, late or twice cannot move a run backwards.
A later fact implies the earlier ones (an uploaded model was trained on positioned files), so a
lost event does not strand a run either.
"""

from __future__ import annotations

from enum import StrEnum

from .models import RunStatusName


class Fact(StrEnum):
    GPU_CREATED = "gpu.created"
    GPU_READY = "gpu.ready"
    IMAGES_READY = "images.ready"
    MODEL_READY = "model.ready"
    FILES_READY = "files.ready"
    TRAINING_COMPLETED = "training.completed"
    MODEL_UPLOADED = "model.uploaded"


# The seed's order: each status waits for the fact that leads out of it.
PROGRESSION: list[tuple[RunStatusName, frozenset[Fact]]] = [
    (RunStatusName.PENDING, frozenset({Fact.GPU_CREATED})),
    (RunStatusName.PENDING_GPU, frozenset({Fact.GPU_READY})),
    (RunStatusName.PENDING_IMAGES, frozenset({Fact.IMAGES_READY})),
    (RunStatusName.PENDING_MODEL, frozenset({Fact.MODEL_READY, Fact.FILES_READY})),
    (RunStatusName.TRAINING, frozenset({Fact.MODEL_UPLOADED})),
]

# Facts that prove every status before the one they lead out of is over.
_IMPLIES: dict[Fact, RunStatusName] = {
    Fact.GPU_READY: RunStatusName.PENDING_GPU,
    Fact.IMAGES_READY: RunStatusName.PENDING_IMAGES,
    Fact.FILES_READY: RunStatusName.PENDING_MODEL,
    Fact.TRAINING_COMPLETED: RunStatusName.PENDING_MODEL,
    Fact.MODEL_UPLOADED: RunStatusName.TRAINING,
}

ORDER = [status for status, _ in PROGRESSION]


def derive_status(facts: set[Fact]) -> RunStatusName:
    """The first status in the seed's order whose way out has not been seen yet."""
    passed = max(
        (ORDER.index(status) for fact, status in _IMPLIES.items() if fact in facts), default=-1
    )
    for index, (status, way_out) in enumerate(PROGRESSION):
        if index > passed and not way_out <= facts:
            return status
    return RunStatusName.TRAINING


def statuses_between(current: RunStatusName, target: RunStatusName) -> list[RunStatusName]:
    """The statuses to walk from `current` (exclusive) to `target` (inclusive), in seed order."""
    if current not in ORDER or target not in ORDER:
        return [target]
    return ORDER[ORDER.index(current) + 1 : ORDER.index(target) + 1]
