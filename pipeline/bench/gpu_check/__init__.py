"""The GPU check: every GPU figure of the project from one bounded run (``bash launch/gpu_check.sh``).

Modules: :mod:`.plan` (the steps: commands, time limits, what each answers), :mod:`.runner` (each step a
subprocess with its limit inside a total budget), :mod:`.parse` (figures from what a step left),
:mod:`.record` (the JSON record and its markdown table), :mod:`.probe` (device and versions),
:mod:`.wheels` (the wheel bundle that takes the missing packages to a GPU machine without a registry).
"""

from .cli import main

__all__ = ["main"]
