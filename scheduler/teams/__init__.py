"""Teams: API keys managed at run time, rate limits, and energy and carbon budgets, shared by every gateway replica.

store.py (the SQLite file), keys.py (run-time keys and their cache), quotas.py (which limits and
budgets apply to a caller), limits.py (requests, tokens, concurrency), budgets.py (joules and gCO2e
per period), guard.py (the serving path's one admission call), routes.py and commands.py (HTTP and CLI).
"""
