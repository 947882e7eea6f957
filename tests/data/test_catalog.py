import pytest
import torch

from msl_rec.data.catalog import ItemCatalog, load_titles, warn_undecodable_titles
from msl_rec.data.errors import DataError

from .helpers import CharTokenizer, brute_force_trie, brute_force_valid

# shared prefixes (ab, abc, abd), a duplicate title (1 and 5), a title that is a prefix of another
# at the token level once quotes are dropped (response_format without quotes below), and a one-char title
TITLES = {1: "ab", 2: "abc", 3: "abd", 4: "b", 5: "ab", 6: "xyz", 7: "abcd"}


@pytest.fixture(params=['"{title}"', "{title}"], ids=["quoted", "bare"])
def catalog(request):
    return ItemCatalog(TITLES, CharTokenizer(), response_format=request.param)


def test_catalog_matches_brute_force_trie(catalog):
    fmt = catalog.response_format
    seqs = {i: [ord(c) for c in fmt.format(title=t)] + [0] for i, t in TITLES.items()}
    root = brute_force_trie(seqs.values())
    for item, seq in seqs.items():
        assert catalog.response_ids(item) == seq
        expected = brute_force_valid(root, seq)
        assert [v.tolist() for v in catalog.valid_ids(item)] == expected
        assert catalog.valid_counts(item).tolist() == [len(v) for v in expected]
        for p in range(len(seq) + 1):
            node = root
            for tok in seq[:p]:
                node = node[tok]
            assert catalog.allowed(seq[:p]) == sorted(node)
    assert catalog.items_for(seqs[1]) == (1, 5)
    assert catalog.items_for(seqs[2]) == (2,)
    assert catalog.items_for(seqs[2][:-1]) == ()
    assert catalog.allowed([ord("q")]) == []


def test_valid_id_tensor_padding():
    catalog = ItemCatalog(TITLES, CharTokenizer())
    t = catalog.valid_id_tensor([4, 7])
    n_pos = max(len(catalog.response_ids(4)), len(catalog.response_ids(7)))
    k = max(int(catalog.valid_counts(i).max()) for i in (4, 7))
    assert t.dtype == torch.long and t.shape == (2, n_pos, k)
    for b, item in enumerate((4, 7)):
        valid = catalog.valid_ids(item)
        for p in range(n_pos):
            row = t[b, p]
            if p < len(valid):
                assert row[: len(valid[p])].tolist() == valid[p].tolist()
                assert (row[len(valid[p]):] == -1).all()
            else:
                assert (row == -1).all()
    # item 4 ('"b"' + EOS) is shorter than item 7, so its tail positions are all padding
    assert (t[0, len(catalog.response_ids(4)):] == -1).all()


def test_unknown_item_is_a_data_error():
    catalog = ItemCatalog(TITLES, CharTokenizer())
    with pytest.raises(DataError, match="item id 99"):
        catalog.response_ids(99)


class _Replay:
    """A tokenizer that returns fixed token lists (title ``str(i)`` -> ``seqs[i]``)."""

    eos_token_id = 7

    def __init__(self, seqs):
        self.seqs = seqs

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [self.seqs[int(t)] for t in texts]}


def test_random_catalog_matches_brute_force_trie():
    """300 random titles over a few token ids (deep sharing, duplicates), some beside the UTF-16
    surrogate block the trie keys skip and some at LLaMA-3's top ids."""
    import random

    rng = random.Random(0)
    alphabet = [3, 4, 5, 0xD7FE, 0xD7FF, 0xD800, 0xDFFF, 0xE000, 128255]
    seqs = {i: [rng.choice(alphabet) for _ in range(rng.randint(1, 9))] for i in range(300)}
    catalog = ItemCatalog({i: str(i) for i in seqs}, _Replay(seqs), response_format="{title}")
    full = {i: s + [7] for i, s in seqs.items()}
    root = brute_force_trie(full.values())
    prefixes = {tuple(s[:p]) for s in full.values() for p in range(1, len(s) + 1)}
    assert catalog.num_nodes == len(prefixes) + 1
    for item, seq in full.items():
        assert catalog.response_ids(item) == seq
        assert [v.tolist() for v in catalog.valid_ids(item)] == brute_force_valid(root, seq)
        assert item in catalog.items_for(seq)
    assert sorted(i for s in catalog.seq_items for i in s) == sorted(seqs)
    for prefix in prefixes:
        node = root
        for tok in prefix:
            node = node[tok]
        assert catalog.allowed(list(prefix)) == sorted(node)


def _item_file(tmp_path, text: str):
    path = tmp_path / "items.json"
    path.write_text(text)
    return path


def test_keys_parsing_to_the_same_id_are_an_error(tmp_path):
    path = _item_file(tmp_path, '{"545": "a", "7": "b", "0545": "c"}')
    with pytest.raises(DataError, match=r"items.json: item keys '545' and '0545' are both item id 545"):
        load_titles(path)


def test_non_string_title_names_key_and_type(tmp_path):
    path = _item_file(tmp_path, '{"1": "a", "2": 42}')
    with pytest.raises(DataError, match=r"items.json: item '2': field 'title' must be a string, got int \(42\)"):
        load_titles(path)


def test_item_file_bom_and_bad_bytes(tmp_path):
    path = tmp_path / "items.json"
    path.write_bytes(b'\xef\xbb\xbf{"1": "a"}')
    assert load_titles(path) == {1: "a"}
    path.write_bytes(b'{"1": "a",\n "2": "\xff"}')
    with pytest.raises(DataError, match=r"items.json: line 2 \(byte offset 18\): .* not UTF-8"):
        load_titles(path)
    path.write_text(f'{{"1": "a", "{2**63}": "b"}}')
    with pytest.raises(DataError, match=r"item key '9223372036854775808'.* does not fit in int64"):
        load_titles(path)


def test_titles_longer_than_max_new_tokens_warn_once():
    catalog = ItemCatalog({1: "ab", 2: "abcdef", 3: "abcdefg", 4: "x"}, CharTokenizer())
    longest = len(catalog.response_ids(3))  # '"abcdefg"' + EOS = 10
    with pytest.warns(UserWarning, match=rf"max_new_tokens=8: 2 catalog item\(s\).*longest is {longest} tokens"):
        assert warn_undecodable_titles(catalog, 8) == 2
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_undecodable_titles(catalog, 8) == 2   # no second warning for the same limit
        assert warn_undecodable_titles(catalog, longest) == 0


def test_build_decoder_warns_about_undecodable_titles():
    from msl_rec.decoding import build_decoder

    catalog = ItemCatalog({1: "ab", 2: "abcdefg"}, CharTokenizer())
    with pytest.warns(UserWarning, match=r"max_new_tokens=5: 1 catalog item\(s\).*e.g. item 2"):
        build_decoder({"name": "cbs", "num_beams": 2, "top_k": [1], "max_new_tokens": 5}, catalog)
