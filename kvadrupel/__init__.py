"""Kvadrupel: the composition root.

The product code lives in the top-level packages (``engine``, ``rules``, ``shards``,
``channels``, ``scheduler``, ``api``); this package only holds what wires them
together: settings, the error tree, logging, the container that builds backends
from settings, and the command line.
"""

__version__ = "0.1.0"
