"""The names of `workflow.patched` checks in the `RLMSession` workflow: each
marks a change of behaviour, so that sessions started before it replay as
they ran and those started since take the new path. A name, once shipped,
never changes.
"""

__all__ = [
    "ASK_WAITS_FOR_START_CHECKS_PATCH",
    "CANCEL_STARTING_QUESTION_PATCH",
    "INGEST_CANCEL_PATCH",
    "INGEST_FAILURE_PATCH",
    "LATE_CANCEL_PATCH",
    "SETTLE_UNSTARTED_QUESTION_PATCH",
    "TEMPORAL_CANCEL_PATCH",
]

# Sessions started since these patches give back the budget held for a
# question whose run could not start, and survive a cancel that reaches a
# question's run after it ended (both used to fail the session's update or
# the session itself); older histories replay as they ran.
SETTLE_UNSTARTED_QUESTION_PATCH = "settle-unstarted-question"
LATE_CANCEL_PATCH = "survive-late-question-cancel"
# Sessions started since this patch end a Temporal cancel that lands while
# their context is stored as cancelled (as one landing later does), not as
# failed with `InvalidContext: Cancelled`.
INGEST_CANCEL_PATCH = "cancel-while-storing-the-context"
# Sessions started since this patch meet a Temporal cancel as the `cancel`
# signal first (the question being answered is cancelled, its ask answered
# `cancelled`; asks waiting for the context being stored answered `cancelled`
# too), then end cancelled; older ones replay as they ended (at once: the ask
# failed, its run went on until Temporal cancelled it).
TEMPORAL_CANCEL_PATCH = "temporal-cancel-as-the-signal"
# Sessions started since this patch cancel a question's run that was starting
# when the session's cancel came (the cancel found no run to signal, and the
# question ran to its end); older ones replay as they ran.
CANCEL_STARTING_QUESTION_PATCH = "cancel-the-question-run-that-was-starting"
# Sessions started since this patch tell the asks waiting for a context that
# could not be stored why (they were cut off: the workflow completed before
# the update), then fail as before; older ones replay as they failed.
INGEST_FAILURE_PATCH = "asks-told-why-the-context-failed"
# Sessions started since this patch start an ask only once the session's
# start checks passed (`_context_ready`); older ones replay as they ran: an
# ask in the first workflow task of a session given a stored context started
# its question before `run` refused the request (e.g. limits.cell_memory_mb
# out of range), and its history holds that child's start.
ASK_WAITS_FOR_START_CHECKS_PATCH = "ask-waits-for-the-session-start-checks"
