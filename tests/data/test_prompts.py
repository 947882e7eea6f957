import warnings

import pytest
from hydra import compose, initialize_config_dir

from msl_rec.data.catalog import ItemCatalog
from msl_rec.data.errors import DataError
from msl_rec.data.prompts import ALPACA_TEMPLATE, PromptBuilder, format_history
from msl_rec.utils.config import CONFIG_DIR

from .helpers import CharTokenizer

# The released code's training prompt (released-code-facts.md), written out by hand: ONE space after
# "request.", the input field = input_prefix + quoted titles + newline + space.
RELEASED_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n \n\n### Response:\n"
)
RELEASED_WORDING = {  # (instruction, input prefix)
    "toy": (("Given a list of toys the user has played before, please recommend a new toy that the user likes to the "
            "user."),
            "The user has played the following toys before: "),
    "books": (("Given a list of books the user has read before, please recommend a new book that the user likes to "
              "the user."),
              "The user has read the following books before: "),
    "clothing": (("Given a list of clothing the user has worn before, please recommend a new clothing that the user "
                 "likes to the user."),
                 "The user has worn the following clothing before: "),
    "office": (("Given a list of office products the user has used before, please recommend a new office product "
               "that the user likes to the user."),
               "The user has used the following office products before: "),
}

TITLES = {1: "one", 2: "two", 3: "three", 4: "four"}


def builder(cutoff_len, bos=False):
    return PromptBuilder(CharTokenizer(bos=bos), TITLES, "Recommend.", "Read: ", cutoff_len)


def test_text_is_alpaca_with_quoted_history_oldest_first():
    text = builder(512).text([3, 1, 2])
    assert format_history(["a", "b"]) == '"a", "b"'
    assert text == RELEASED_TEMPLATE.format(instruction="Recommend.", input='Read: "three", "one", "two"')
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
    # the other row fits (the instruction survives somewhere), so a warning, not an error
    b.cutoff_len = len(b.text([3])) + 1 + rlen - 5  # 5 tokens short for [3]: template opening cut
    with pytest.warns(UserWarning, match=r"cutoff_len=\d+: 1 of 2 prompt\(s\) .* left-truncated .* 0 of them lost"):
        ids, _ = b.build_batch([[1, 2, 3], [3]], [rlen, rlen - 6])
    assert ids == ([1] + [ord(c) for c in b.text([3])])[-(b.cutoff_len - rlen):]


def test_tiny_cutoff_where_every_prompt_loses_its_instruction_is_an_error():
    b = builder(8)
    with pytest.raises(DataError, match=r"cutoff_len=8: 2 of 2 prompt\(s\).*2 of them lost their instruction"):
        b.build_batch([[1, 2], [3]], [5, 5])
    b.cutoff_len = len(b.text([1])) + 5  # row 1 fits; row 2's response leaves it one token
    with pytest.warns(UserWarning, match=r"1 of 2 prompt\(s\).*kept 1 token.*1 of them lost their instruction"):
        b.build_batch([[1], [2]], [5, b.cutoff_len])


def test_no_warning_when_everything_fits():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        builder(10_000).build_batch([[1, 2], [3]], [5, 5])


def test_books_prompt_is_the_released_text_char_for_char():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("stats", overrides=["dataset=books"])
    titles = {1: "Dune", 2: 'The "Hobbit"', 3: "Emma"}
    b = PromptBuilder.from_config(cfg.dataset, CharTokenizer(), titles)
    instruction, prefix = RELEASED_WORDING["books"]
    expected = RELEASED_TEMPLATE.format(instruction=instruction, input=prefix + '"Dune", "The "Hobbit"", "Emma"')
    assert b.text([1, 2, 3]) == expected
    assert "request. \n\n### Instruction:" in expected and '"Emma"\n \n\n### Response:\n' in expected


@pytest.mark.parametrize("name", sorted(RELEASED_WORDING))
def test_dataset_wording_is_the_released_one(name):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("stats", overrides=[f"dataset={name}"])
    assert (cfg.dataset.instruction, cfg.dataset.input_prefix) == RELEASED_WORDING[name]


def test_bos_tokenizer_prompt_starts_with_bos_response_does_not():
    """A stub BOS tokenizer (BOS 1): prompts carry it, catalog responses do not."""
    tok = CharTokenizer(bos=True)
    catalog = ItemCatalog(TITLES, tok)
    b = PromptBuilder(tok, TITLES, "Recommend.", "Read: ", 512)
    assert b.build([1, 2], len(catalog.response_ids(3)))[0] == 1
    assert all(catalog.response_ids(i)[0] != 1 for i in TITLES)


@pytest.mark.slow
def test_llama3_prompt_starts_with_bos_128000_and_responses_do_not():
    from msl_rec.data.tokenizers import load_llama3_tokenizer

    tok = load_llama3_tokenizer()
    catalog = ItemCatalog(TITLES, tok)
    b = PromptBuilder(tok, TITLES, "Recommend.", "Read: ", 512)
    prompt = b.build([1, 2], len(catalog.response_ids(3)))
    assert prompt[0] == 128000 and prompt.count(128000) == 1
    assert prompt[1:] == tok(b.text([1, 2]), add_special_tokens=False)["input_ids"]
    for i in TITLES:
        assert catalog.response_ids(i)[0] != 128000 and catalog.response_ids(i)[-1] == 128001


def test_batch_equals_one_by_one():
    b = builder(len(ALPACA_TEMPLATE) + 20)
    hists, rlens = [[1, 2, 3, 4], [2], [4, 3]], [3, 5, 8]
    assert b.build_batch(hists, rlens) == [b.build(h, r) for h, r in zip(hists, rlens)]
    for ids, r in zip(b.build_batch(hists, rlens), rlens):
        assert len(ids) + r <= b.cutoff_len
