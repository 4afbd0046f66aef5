"""lmfleet: serve large language models in production.

The engine (``lmfleet.engine``) turns token ids into token ids; the server, gateway
and autoscaler build on it without reaching into its internals.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
