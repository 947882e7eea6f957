from msl_rec.data.prompts import ALPACA_TEMPLATE, PromptBuilder, format_history

from .helpers import CharTokenizer

TITLES = {1: "one", 2: "two", 3: "three", 4: "four"}


def builder(cutoff_len, bos=False):
    return PromptBuilder(CharTokenizer(bos=bos), TITLES, "Recommend.", "Read: ", cutoff_len)


def test_text_is_alpaca_with_quoted_history_oldest_first():
    text = builder(512).text([3, 1, 2])
    assert format_history(["a", "b"]) == '"a", "b"'
    assert text == ALPACA_TEMPLATE.format(instruction="Recommend.", input='Read: "three", "one", "two"')
    assert text.startswith("Below is an instruction") and text.endswith("### Response:\n")


def test_fits_without_truncation_and_adds_special_tokens():
    b = builder(512, bos=True)
    ids = b.build([1, 2], response_len=5)
    assert ids == [1] + [ord(c) for c in b.text([1, 2])]


def test_drops_oldest_history_items_until_it_fits():
    b = builder(10_000)
    full = len(b.text([1, 2, 3, 4]))
    without_oldest = len(b.text([2, 3, 4]))
    rlen = 7
    b.cutoff_len = without_oldest + rlen  # the full history is too long by the first item only
    assert full + rlen > b.cutoff_len
    assert b.build([1, 2, 3, 4], rlen) == [ord(c) for c in b.text([2, 3, 4])]
    b.cutoff_len = len(b.text([4])) + rlen
    assert b.build([1, 2, 3, 4], rlen) == [ord(c) for c in b.text([4])]


def test_left_truncates_when_one_item_is_still_too_long():
    b = builder(60, bos=True)
    rlen = 10
    ids = b.build([1, 2, 3], rlen)
    assert len(ids) == 60 - rlen
    assert ids == ([1] + [ord(c) for c in b.text([3])])[-(60 - rlen):]


def test_batch_equals_one_by_one():
    b = builder(len(ALPACA_TEMPLATE) + 20)
    hists, rlens = [[1, 2, 3, 4], [2], [4, 3]], [3, 5, 8]
    assert b.build_batch(hists, rlens) == [b.build(h, r) for h, r in zip(hists, rlens)]
    for ids, r in zip(b.build_batch(hists, rlens), rlens):
        assert len(ids) + r <= b.cutoff_len
