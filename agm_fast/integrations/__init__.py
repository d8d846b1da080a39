"""agm_fast in the trainers people already run: PyTorch Lightning (:mod:`agm_fast.integrations.lightning`) and the
Hugging Face ``Trainer`` (:mod:`agm_fast.integrations.hf`).

Both are optional: ``pip install "agm_fast[lightning]"`` / ``pip install "agm_fast[hf]"``. ``import agm_fast`` never
imports them; importing an integration without its trainer raises an ImportError that says what to install.

Every integration drives the one method interface (:mod:`agm_fast.methods`), so every method works in every
trainer: the forward and the loss go through ``method.forward`` / ``method.loss``, and the gradients are modulated by
``method.before_optimizer_step()`` after the trainer has unscaled them (AMP) and before the optimizer steps.
"""

__all__ = ["missing"]


def missing(package: str, extra: str) -> ImportError:
    """The error an integration raises when its trainer is not installed."""
    return ImportError(
        f"this agm_fast integration needs {package}, which is not installed: pip install \"agm_fast[{extra}]\" "
        f"(or pip install {package})"
    )
