"""Stable names: other services start runs and find them by these strings.

Changing one breaks running workflows and external callers; add, never rename.
"""

WORKFLOW_RLM_RUN = "RLMRun"
WORKFLOW_RLM_SESSION = "RLMSession"
TASK_QUEUE_DEFAULT = "rlm"

ACTIVITY_RESOLVE_MODELS = "resolve_models"
ACTIVITY_ROOT_TURN = "root_turn"
ACTIVITY_RUN_CELL = "run_cell"
ACTIVITY_LLM_CALL = "llm_call"
ACTIVITY_LLM_CALLS = "llm_calls"
# A call group with lanes (workflows/call_groups.py) has a name of its own, so
# that during a rolling upgrade no worker that predates lanes (and would run
# all of the group's calls at once, past the run's concurrency) picks one up.
ACTIVITY_LLM_CALLS_IN_LANES = "llm_calls_in_lanes"
# Activities that carry a group of sub-calls each.
CALL_GROUP_ACTIVITIES = (ACTIVITY_LLM_CALLS, ACTIVITY_LLM_CALLS_IN_LANES)
# Activities that carry `llm_query` sub-calls: one each, or a group.
SUB_CALL_ACTIVITIES = (ACTIVITY_LLM_CALL, *CALL_GROUP_ACTIVITIES)
ACTIVITY_INGEST_CONTEXT = "ingest_context"
ACTIVITY_RESOLVE_TOOLS = "resolve_tools"
ACTIVITY_TOOL_CALL = "tool_call"
ACTIVITY_COMPACT_TRANSCRIPT = "compact_transcript"

UPDATE_SUBCALLS = "subcalls"
UPDATE_SET_CAPS = "set_caps"
UPDATE_TOOL_CALL = "tool_call"
SIGNAL_CANCEL = "cancel"
QUERY_PROGRESS = "progress"

# The failure type of a cell whose REPL memory cap this worker's whole guest
# memory budget cannot hold (activities/run_cell.py): no later cell can run.
REPL_TOO_LARGE = "GuestMemoryTooLarge"
# The failure type of a cell whose context does not fit in the REPL's memory
# cap (loading it ran out of memory): no later cell can run either.
CONTEXT_TOO_LARGE = "ContextTooLarge"

# The session workflow (workflows/session.py).
UPDATE_ASK = "ask"
UPDATE_CLOSE = "close"
QUERY_SESSION = "session"
# The failure type of an `ask` refused because its update id was answered
# before the session continued as new; its details hold the answering run's id.
ASK_ANSWERED_ALREADY = "AskAnsweredAlready"

# Search attributes registered on the embedded server (`rlm up`) and set by
# RLMRun; production clusters register them once with
# `temporal operator search-attribute create`.
SEARCH_ATTRIBUTES = {
    "RlmDepth": "Int",
    "RlmRootRunId": "Keyword",
    "RlmStatus": "Keyword",
}
