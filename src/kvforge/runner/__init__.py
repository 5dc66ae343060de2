"""Model runner: batch building, model forward, sampling."""

from kvforge.runner.model_runner import ModelRunner, ModelRunnerOutput, TokenLogprobs

__all__ = ["ModelRunner", "ModelRunnerOutput", "TokenLogprobs"]
