"""The state a run (workflows/run.py) and its turn loop (workflows/turn.py)
share: the budget, the usage, the counters and the routers of sub-calls and
tool calls. One small object, so neither reaches into the other's fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from workflows.budget import Ledger
from workflows.result import Usage
from workflows.steps import ModelInfo

if TYPE_CHECKING:
    from workflows.subcalls import SubcallRouter
    from workflows.tool_calls import ToolRouter

__all__ = ["RunState"]


@dataclass
class RunState:
    ledger: Ledger
    """The run's budget: every call reserves here before it starts."""
    usage: Usage
    """Spend of the run and its subtree, by model and depth."""
    turn: int = 0
    """Root turns taken so far (across the continue-as-new chain)."""
    cells: int = 0
    """Cells run so far (across the chain)."""
    models: dict[str, ModelInfo] = field(default_factory=dict)
    """Every model the run may call, resolved once at its start."""
    router: SubcallRouter | None = None
    """Sub-calls of the run's cells (set once the models are known)."""
    tools: ToolRouter | None = None
    """Custom-tool calls of the run's cells (when the run names tools)."""
