"""The Alpaca-style prompt of BIGRec/MSL and a builder that fits it into ``cutoff_len``.

The prompt and the response are tokenised separately: the prompt text (with the tokenizer's
special tokens, e.g. BOS if it adds one) and then the catalog's response ids (``"Title"`` + EOS,
tokenised on their own) appended. The joined text is never re-tokenised, so the label ids of a
target are exactly :meth:`ItemCatalog.response_ids` and the trie's valid sets apply to them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def format_history(titles: Sequence[str]) -> str:
    """History titles, oldest first, each quoted and joined by ``", "``: ``"A", "B"``."""
    return ", ".join(f'"{t}"' for t in titles)


class PromptBuilder:
    """Build prompt token ids from a user's history.

    Args:
        tokenizer: a HF tokenizer (or any callable returning ``{"input_ids": ...}``).
        titles: item id -> title.
        instruction: the dataset's instruction sentence.
        input_prefix: text before the quoted history titles in the input field.
        cutoff_len: the most tokens of prompt + response.
        template: the prompt template with ``{instruction}`` and ``{input}``.
    """

    def __init__(self, tokenizer, titles: Mapping[int, str], instruction: str, input_prefix: str,
                 cutoff_len: int, template: str = ALPACA_TEMPLATE):
        if cutoff_len < 2:
            raise ValueError(f"cutoff_len must be >= 2 (got {cutoff_len})")
        self.tokenizer = tokenizer
        self.titles = titles
        self.instruction = instruction
        self.input_prefix = input_prefix
        self.cutoff_len = cutoff_len
        self.template = template

    def text(self, history: Sequence[int]) -> str:
        """The prompt text for a history of item ids (oldest first)."""
        body = self.input_prefix + format_history([self.titles[i] for i in history])
        return self.template.format(instruction=self.instruction, input=body)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tokenizer(texts)["input_ids"]]

    def build(self, history: Sequence[int], response_len: int) -> list[int]:
        """Prompt ids for one history; see :meth:`build_batch`."""
        return self.build_batch([history], [response_len])[0]

    def build_batch(self, histories: Sequence[Sequence[int]], response_lens: Sequence[int]) -> list[list[int]]:
        """Prompt ids for many histories, tokenised in one batch call.

        When ``len(prompt) + response_len > cutoff_len`` the OLDEST history items are dropped one
        at a time until it fits, keeping at least the most recent one. If the one-item prompt is
        still too long, its ids are left-truncated to ``max(cutoff_len - response_len, 1)`` tokens
        (which cuts the template's opening and a BOS). The response is never truncated, so a
        response longer than ``cutoff_len - 1`` yields a row longer than ``cutoff_len``.
        """
        out = self._encode([self.text(h) for h in histories])
        for b, (hist, rlen) in enumerate(zip(histories, response_lens)):
            budget = self.cutoff_len - rlen
            start = 0
            while len(out[b]) > budget and start < len(hist) - 1:
                start += 1
                out[b] = self._encode([self.text(hist[start:])])[0]
            if len(out[b]) > budget:
                out[b] = out[b][-max(budget, 1):]
        return out
