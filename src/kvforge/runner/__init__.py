"""Model runner: batch building, model forward, sampling."""

from kvforge.core.step_io import ModelRunnerOutput, TokenLogprobs
from kvforge.runner.model_runner import ModelRunner

__all__ = ["ModelRunner", "ModelRunnerOutput", "TokenLogprobs"]
