"""The one place litellm is imported: offline, quiet, and without retries of its own.

Import `litellm` from here (`from activities._litellm_setup import litellm`),
never directly, so these settings always apply before its first use.
"""

from __future__ import annotations

import logging
import os
import warnings

# Without this litellm downloads its price list at import time (no internet on
# workers, and prices must not change under a running budget).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# Telemetry / feedback banners are noise in a worker's log.
os.environ.setdefault("LITELLM_LOG", "ERROR")

import litellm  # noqa: E402 - must follow the environment settings above

# No "Give Feedback / Get Help" banners printed on every exception.
litellm.suppress_debug_info = True
litellm.set_verbose = False
# Token counting must never fetch a tokenizer from the internet; tiktoken's
# bundled encodings are close enough for estimates and budget reservations.
litellm.disable_hf_tokenizer_download = True
# Prompts may hold user data: keep them out of litellm's own logging hooks.
litellm.turn_off_message_logging = True

# litellm's pydantic models emit one UserWarning per TypedDict on first use.
warnings.filterwarnings("ignore", message=r".*ReadOnly.* qualifier", category=UserWarning)

for _name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "httpx"):
    logging.getLogger(_name).setLevel(logging.ERROR)

__all__ = ["litellm"]
