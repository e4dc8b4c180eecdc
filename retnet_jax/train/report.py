"""What a finished run prints: its losses (beside the byte entropy, for bytes), checkpoint and sample."""

from __future__ import annotations

from typing import Any


def describe(summary: dict[str, Any]) -> str:
    """Lines for a `train()` summary."""
    lines = [f"{summary['status']} at step {summary['step']} in {summary['wall_s']:.0f} s"
             + (f" ({summary['tokens_per_s']:,.0f} tokens/s)" if summary.get("tokens_per_s") else "")]
    if summary.get("loss") is not None:
        lines.append(f"training loss   {summary['loss']:.4f} nats/token")
    if summary.get("val_loss") is not None:
        lines.append(f"validation loss {summary['val_loss']:.4f} nats/token "
                     f"(perplexity {summary['val_ppl']:.2f})")
    entropy = summary.get("byte_entropy")
    if entropy is not None and summary.get("val_loss") is not None:
        lines.append(f"byte unigram entropy of the validation split {entropy:.4f} nats: the "
                     f"validation loss is {summary['val_loss'] / entropy:.2f} of it")
    lines.append(f"checkpoint      {summary['checkpoint']}")
    if summary.get("plot"):
        lines.append(f"loss curve      {summary['plot']}")
    if summary.get("sample") is not None:
        lines += ["sample:", summary["sample"]]
    return "\n".join(lines)
