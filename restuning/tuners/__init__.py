"""Res-Tuners, the bypass they form, and the task module (bypass + head).

Importing this package registers the built-in tuner kinds.
"""

from restuning.tuners import res_adapter, res_prefix, res_prompt
from restuning.tuners.base import ResTuner
from restuning.tuners.bypass import Bypass, pool_tokens, run_bypass
from restuning.tuners.registry import TUNERS, register_tuner, tuner_class
from restuning.tuners.task import TaskModule, build_task, init_task

__all__ = [
    "TUNERS",
    "Bypass",
    "ResTuner",
    "TaskModule",
    "build_task",
    "init_task",
    "pool_tokens",
    "register_tuner",
    "res_adapter",
    "res_prefix",
    "res_prompt",
    "run_bypass",
    "tuner_class",
]
