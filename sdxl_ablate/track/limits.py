"""MLflow's limits on what one run records, and the one cut that keeps values within them.

Both trackers cut here, so the journal holds what MLflow would have stored and a journaled
run replays without a value the store refuses.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence, TypeVar

from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH

T = TypeVar("T")


def param_value(value: Any) -> str:
    return str(value)[:MAX_PARAM_VAL_LENGTH]


def tag_values(tags: dict[str, Any]) -> dict[str, str]:
    return {k: str(v)[:MAX_TAG_VAL_LENGTH] for k, v in tags.items()}


def param_values(params: dict[str, Any]) -> dict[str, str]:
    return {k: param_value(v) for k, v in params.items()}


def batches(items: Sequence[T]) -> Iterator[Sequence[T]]:
    """`items` in the slices one `log_batch` call accepts."""
    for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        yield items[i : i + MAX_PARAMS_TAGS_PER_BATCH]
