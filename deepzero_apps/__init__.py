"""deepzero-apps: zeroth-order training of deep models through black boxes."""

__version__ = "0.1.0"
