"""OpenVLA's prompt template (``prismatic`` ``PurePromptBuilder`` for ``openvla-7b``)."""

from __future__ import annotations

PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"


def normalize_instruction(instruction: str) -> str:
    """Lower-case and strip, as OpenVLA does before formatting; an empty instruction is refused."""
    if not isinstance(instruction, str):
        raise ValueError(f"instruction must be a str, got {type(instruction).__name__}")
    text = instruction.strip().lower()
    if not text:
        raise ValueError("instruction is empty")
    return text


def build_prompt(instruction: str) -> str:
    """``In: What action should the robot take to {instruction}?\\nOut:`` with a normalised instruction."""
    return PROMPT_TEMPLATE.format(instruction=normalize_instruction(instruction))
