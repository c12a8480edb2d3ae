"""What the Hugging Face generation tests share: their prompts, and a row of tokens up to its end."""

PROMPTS = ["Return the value of", "If the", "Raise ValueError when the argument is not a"]


def until_eos(row, eos):
    """The tokens of `row` up to and with its first end-of-text token (after it they mean nothing)."""
    ids = [int(t) for t in row]
    ends = [i for i, t in enumerate(ids) if t in eos]
    return ids[: ends[0] + 1] if ends else ids
