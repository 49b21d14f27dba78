"""What the tools' command lines share."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in its help, except where there is none to say: an option whose default
    is None says itself what happens without it (argparse printed "(default: None)" after that)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)
