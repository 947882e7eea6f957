"""The Alpaca-style prompt of BIGRec/MSL and a builder that fits it into ``cutoff_len``.

The prompt and the response are tokenised separately: the prompt text (with the tokenizer's
special tokens, e.g. BOS if it adds one) and then the catalog's response ids (``"Title"`` + EOS,
tokenised on their own) appended. The joined text is never re-tokenised, so the label ids of a
target are exactly :meth:`ItemCatalog.response_ids` and the trie's valid sets apply to them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

from msl_rec.data.errors import DataError

# The released code's training template, character for character: ONE space after "request."
# (its inference script has two; this framework uses the training text for training AND decoding,
# so a model is evaluated on the prompt it was tuned on).
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
# the released input field ends in newline + space: input_prefix + '"t1", "t2"' + INPUT_SUFFIX
INPUT_SUFFIX = "\n "


def format_history(titles: Sequence[str]) -> str:
    """History titles, oldest first, each quoted and joined by ``", "``: ``"A", "B"``."""
    return ", ".join(f'"{t}"' for t in titles)


class PromptBuilder:
    """Build prompt token ids from a user's history.

    Args:
        tokenizer: a HF tokenizer (or any callable returning ``{"input_ids": ...}``). Its special
            tokens are added to the prompt (LLaMA-3's BOS 128000; SmolLM2 adds none).
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

    @classmethod
    def from_config(cls, dataset_cfg, tokenizer, titles: Mapping[int, str]) -> PromptBuilder:
        """The builder a ``configs/dataset/*.yaml`` config (a mapping or an object) describes."""
        get = dataset_cfg.get if hasattr(dataset_cfg, "get") else (lambda k, d=None: getattr(dataset_cfg, k, d))
        return cls(tokenizer, titles, get("instruction"), get("input_prefix"), int(get("cutoff_len", 512)))

    def text(self, history: Sequence[int]) -> str:
        """The prompt text for a history of item ids (oldest first)."""
        body = self.input_prefix + format_history([self.titles[i] for i in history]) + INPUT_SUFFIX
        return self.template.format(instruction=self.instruction, input=body)

    def preamble_ids(self) -> list[int]:
        """The token ids every prompt of this builder starts with (the template's header, the
        instruction and the input prefix, with the tokenizer's special tokens): the common prefix of
        two prompts whose histories differ from their first character on. A prompt left-truncated to
        fit ``cutoff_len`` may not start with all of it (the inference layer checks each prompt)."""
        a, b = self._encode([self.template.format(instruction=self.instruction,
                                                  input=self.input_prefix + format_history([t]) + INPUT_SUFFIX)
                             for t in ("A", "z")])
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return a[:n]

    def _encode(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]

    def build(self, history: Sequence[int], response_len: int) -> list[int]:
        """Prompt ids for one history; see :meth:`build_batch`."""
        return self.build_batch([history], [response_len])[0]

    def build_batch(self, histories: Sequence[Sequence[int]], response_lens: Sequence[int]) -> list[list[int]]:
        """Prompt ids for many histories, tokenised in one batch call; see :meth:`fit_batch`."""
        return [ids for _, ids in self.fit_batch(histories, response_lens)]

    def fit_batch(self, histories: Sequence[Sequence[int]],
                  response_lens: Sequence[int]) -> list[tuple[int, list[int]]]:
        """``(start, prompt ids)`` per history: the prompt of ``history[start:]`` fitted to ``cutoff_len``.

        When ``len(prompt) + response_len > cutoff_len`` the OLDEST history items are dropped one
        at a time until it fits, keeping at least the most recent one. If the one-item prompt is
        still too long, its ids are left-truncated to ``max(cutoff_len - response_len, 1)`` tokens
        (which cuts the template's opening and a BOS): that warns with the counts, and if EVERY
        prompt loses its instruction it is a :class:`DataError` (``cutoff_len`` is too small to
        mean anything). The response is never truncated, so a response longer than
        ``cutoff_len - 1`` yields a row longer than ``cutoff_len``.
        """
        out = self._encode([self.text(h) for h in histories])
        starts = [0] * len(out)
        truncated: list[int] = []
        for b, (hist, rlen) in enumerate(zip(histories, response_lens)):
            budget = self.cutoff_len - rlen
            while len(out[b]) > budget and starts[b] < len(hist) - 1:
                starts[b] += 1
                out[b] = self._encode([self.text(hist[starts[b]:])])[0]
            if len(out[b]) > budget:
                truncated.append(b)
                out[b] = out[b][-max(budget, 1):]
        if truncated:
            self._report_truncation(histories, response_lens, starts, out, truncated)
        return list(zip(starts, out))

    def _report_truncation(self, histories, response_lens, starts, out, truncated: list[int]) -> None:
        texts = [self.text(histories[b][starts[b]:]) for b in truncated]
        # the tokens from the instruction on: a prompt keeping fewer has lost (part of) its instruction
        tails = self._encode([t[max(t.find(self.instruction), 0):] for t in texts], add_special_tokens=False)
        lost = sum(len(out[b]) < len(tail) for b, tail in zip(truncated, tails))
        need = max(len(ids) for ids in self._encode(texts)) + max(response_lens[b] for b in truncated)
        msg = (f"dataset.cutoff_len={self.cutoff_len}: {len(truncated)} of {len(histories)} prompt(s) do not fit even "
               f"with only the most recent history item and were left-truncated (the shortest kept "
               f"{min(len(out[b]) for b in truncated)} token(s)); {lost} of them lost their instruction. Raise "
               f"dataset.cutoff_len (the longest such prompt + response needs {need} tokens).")
        if lost == len(histories):
            raise DataError(msg)
        warnings.warn(msg, stacklevel=3)


SLOT_OPEN, SLOT_CLOSE = "\ue000", "\ue001"  # private-use characters around a slot index in a prompt's text


class SlotPromptBuilder(PromptBuilder):
    """A hybrid method's prompt (LLaRA, A-LLMRec): each history title followed by its item's slot id, and
    (``user_slot``) a leading user slot and ``user_text`` before the history (A-LLMRec's "[user] is a user
    representation."). Slot ids are ``slot_base + index`` (:mod:`msl_rec.models.hybrid` embeds them):
    ``index_of[item]`` for an item, ``num_items`` for the user. Text pieces between slots are tokenised on their
    own (the first with the tokenizer's special tokens), so the text-only tokens are the same with or without
    slot embeddings.

    Args (beside :class:`PromptBuilder`'s): slot_base: the first slot id (the tokenizer's size); index_of: item
    id -> the encoder's item index; item_slots / user_slot / user_text: ``method.prompt``.
    """

    def __init__(self, tokenizer, titles: Mapping[int, str], instruction: str, input_prefix: str, cutoff_len: int,
                 slot_base: int, index_of: Mapping[int, int], item_slots: bool = True, user_slot: bool = False,
                 user_text: str = " is a user representation. ", template: str = ALPACA_TEMPLATE):
        super().__init__(tokenizer, titles, instruction, input_prefix, cutoff_len, template)
        marked = [i for i, t in titles.items() if SLOT_OPEN in t or SLOT_CLOSE in t]
        if marked:
            raise DataError(f"item {marked[0]}: its title holds U+E000/U+E001, which hybrid prompts use to mark slots")
        missing = [i for i in titles if i not in index_of]
        if missing:
            raise DataError(f"item {missing[0]} (and {len(missing) - 1} more) has no index in the encoder's catalog")
        self.slot_base, self.index_of = int(slot_base), dict(index_of)
        self.user_index = len(self.index_of)
        self.item_slots, self.user_slot, self.user_text = bool(item_slots), bool(user_slot), user_text

    @classmethod
    def from_config(cls, dataset_cfg, tokenizer, titles: Mapping[int, str], slot_base: int = 0,
                    index_of: Mapping[int, int] | None = None, **slots) -> SlotPromptBuilder:
        get = dataset_cfg.get if hasattr(dataset_cfg, "get") else (lambda k, d=None: getattr(dataset_cfg, k, d))
        return cls(tokenizer, titles, get("instruction"), get("input_prefix"), int(get("cutoff_len", 512)),
                   slot_base, index_of or {}, **slots)

    @staticmethod
    def _mark(index: int) -> str:
        return f"{SLOT_OPEN}{index}{SLOT_CLOSE}"

    def _text_of(self, pairs: Sequence[tuple[str, int]]) -> str:
        """The prompt text of (title, item id) pairs, slots marked."""
        items = ", ".join(f'"{t}" {self._mark(self.index_of[i])}' if self.item_slots else f'"{t}"' for t, i in pairs)
        user = self._mark(self.user_index) + self.user_text if self.user_slot else ""
        return self.template.format(instruction=self.instruction, input=user + self.input_prefix + items + INPUT_SUFFIX)

    def text(self, history: Sequence[int]) -> str:
        return self._text_of([(self.titles[i], i) for i in history])

    def preamble_ids(self) -> list[int]:
        """The ids every prompt starts with, up to the first slot (a slot's embedding is per user)."""
        item = next(iter(self.index_of))
        a, b = self._encode([self._text_of([(t, item)]) for t in ("A", "z")])
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y or x >= self.slot_base), min(len(a), len(b)))
        return a[:n]

    def _encode(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        out = []
        for text in texts:
            pieces = text.split(SLOT_OPEN)
            ids = list(self.tokenizer([pieces[0]], add_special_tokens=add_special_tokens)["input_ids"][0])
            for piece in pieces[1:]:
                index, rest = piece.split(SLOT_CLOSE, 1)
                ids.append(self.slot_base + int(index))
                if rest:
                    ids.extend(self.tokenizer([rest], add_special_tokens=False)["input_ids"][0])
            out.append(ids)
        return out
