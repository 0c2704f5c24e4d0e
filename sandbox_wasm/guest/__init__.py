"""Guest-side modules: they run inside the WASI CPython (seen there as /rlm/guest).

The host imports only `rlm_codec` from here (the shared wire format).
"""
