"""msbd: a supervisor daemon for libkrun microVM sandboxes."""

__version__ = "0.1.0"
