"""The `function` reward source: your Python function (`reward.function: path/to/file.py:name`), which the
RewardWorker calls once per sample as name(query=, response=, answer=, sample_id=), in the worker's process.

Where its code comes from: the config reads the file once, on the driver, at validation (the read that checks it
with `ast`), and the text travels inside RewardConfig to every worker, which runs it as a module of its own. So the
file need not exist on the workers' nodes (no shared storage; an absolute path on the driver's machine works), and
every worker, restarts included, runs the version that the run validated, even if the file changes meanwhile.

It returns a number (float, int, bool: the reward) or a dict: "score" (required) the reward, "accuracy" (optional)
the sample's `task/accuracy`, any other key a number logged as `reward/function/<key>`. A function that raises, or
returns anything else (a string, None, NaN, a dict without "score"), is a bug in it: the worker raises an error
naming `file.py:name` and the sample id, which stops the run. It is never scored 0 nor counted as an infra error.
"""

from __future__ import annotations

import importlib.util
import linecache
import math
import re
import sys
from pathlib import Path


def _finite(value: object, what: str, where: str) -> float:
    if not hasattr(value, "__float__"):  # float, int, bool, numpy scalars; not str, None, list
        raise TypeError(f"{where}: {what} {value!r:.100} is a {type(value).__name__}, not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{where}: {what} is {number}, not a finite number")
    return number


class RewardFunction:
    """The user's function, run from the source text that the driver read; a call checks what it returns."""

    def __init__(self, spec: str, source: str) -> None:
        self.spec = spec
        path, _, name = spec.rpartition(":")
        module_name = "reward_function_" + re.sub(r"\W", "_", Path(path).stem)  # its own name: shadows no import
        module = importlib.util.module_from_spec(importlib.util.spec_from_loader(module_name, None, origin=path))
        module.__file__ = path
        # Tracebacks show the function's lines even on a node where the file is absent (mtime None: kept as is).
        linecache.cache[path] = (len(source), None, source.splitlines(keepends=True), path)
        sys.modules[module_name] = module  # dataclasses and pickle look a class's module up there
        try:  # to say which file failed; its own traceback is chained
            exec(compile(source, path, "exec"), module.__dict__)
        except Exception as e:
            raise RuntimeError(f"reward.function {spec}: running {path} failed: {type(e).__name__}: {e}") from e
        self.fn = getattr(module, name)

    def __call__(
        self, query: str, response: str, answer: str | None, sample_id: str
    ) -> tuple[float, float | None, dict[str, float]]:
        """(reward, accuracy or None, components) of one sample."""
        where = f"reward.function {self.spec} on sample {sample_id}"
        try:  # to say which function and sample failed; its own traceback is chained
            result = self.fn(query=query, response=response, answer=answer, sample_id=sample_id)
        except Exception as e:
            raise RuntimeError(f"{where} raised {type(e).__name__}: {e}") from e
        if not isinstance(result, dict):
            score = _finite(result, "the return value", where)
            return score, None, {"function": score}
        if "score" not in result:
            raise ValueError(f"{where}: returned a dict without 'score' (its keys: {', '.join(map(str, result))})")
        score = _finite(result["score"], "'score'", where)
        accuracy = result.get("accuracy")
        if accuracy is not None:
            accuracy = _finite(accuracy, "'accuracy'", where)
        parts = {
            f"function/{key}": _finite(value, f"'{key}'", where)
            for key, value in result.items()
            if key not in ("score", "accuracy")
        }
        return score, accuracy, {"function": score, **parts}
