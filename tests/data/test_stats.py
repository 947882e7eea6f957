import pytest
from hydra import compose, initialize_config_dir

from msl_rec.data.catalog import ItemCatalog
from msl_rec.data.io import read_samples
from msl_rec.stats import dataset_stats, stats
from msl_rec.utils.config import CONFIG_DIR

from .helpers import CharTokenizer, brute_force_trie


def brute_force_avt(catalog, samples) -> float:
    root = brute_force_trie(catalog.sequences)
    total = positions = 0
    for s in samples:
        node = root
        for tok in catalog.response_ids(s.target):  # the EOS-predicting position included
            total += len(node)
            positions += 1
            node = node[tok]
    return total / positions


def test_synthetic_stats(tmp_path):
    titles = {1: "ab", 2: "abc", 3: "b"}
    catalog = ItemCatalog(titles, CharTokenizer())
    path = tmp_path / "rows.csv"
    path.write_text('user_id,item_ids,timestamp\n1,"[1, 2]",5\n1,"[2, 3]",6\n2,"[3, 1]",7\n')
    samples = read_samples(path, titles)
    s = dataset_stats(samples, catalog)
    # '"ab"': root 1 ('"'), then {a, b}, then {b}, then {", c}, then {EOS}: 1+2+1+2+1 = 7 over 5
    assert s["users"] == 2 and s["items"] == 3 and s["interactions"] == 5 and s["rows"] == 3
    assert s["density"] == pytest.approx(5 / 6)
    assert s["avt"] == pytest.approx(brute_force_avt(catalog, samples))
    assert s["avg_title_tokens"] == pytest.approx((4 + 5 + 3) / 3)


@pytest.mark.slow
def test_books_avt_llama3_matches_brute_force(capsys):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("stats", overrides=["dataset=books", "backbone=llama3_8b"])
    result = stats(cfg)
    assert "AVT: 70.69" in capsys.readouterr().out
    from msl_rec.data.tokenizers import load_llama3_tokenizer

    catalog = ItemCatalog.from_file(cfg.dataset.item_file, load_llama3_tokenizer(), allow_empty_titles=True)
    assert result["avt"] == pytest.approx(brute_force_avt(catalog, read_samples(cfg.dataset.train_file)))
    assert result["items"] == 6344 and result["rows"] == 8977


def test_show_prompt_prints_the_first_train_rows_prompt_as_json(tmp_path, capsys):
    import json

    from msl_rec.data.tokenizers import load_gguf_tokenizer

    from .test_prompts import RELEASED_TEMPLATE, RELEASED_WORDING

    (tmp_path / "items.json").write_text('{"1": "Dune", "2": "Emma", "3": "Ulysses"}')
    (tmp_path / "train.csv").write_text('user_id,item_ids,timestamp\n4,"[3, 1, 2]",5\n5,"[1, 2]",6\n')
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("stats", overrides=["dataset=books", "show_prompt=1", f"dataset.item_file={tmp_path}/items.json",
                                          f"dataset.train_file={tmp_path}/train.csv"])
    stats(cfg)
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    instruction, prefix = RELEASED_WORDING["books"]
    assert record["prompt"] == RELEASED_TEMPLATE.format(instruction=instruction, input=prefix + '"Ulysses", "Dune"')
    tok = load_gguf_tokenizer()
    assert record["prompt_ids"] == tok(record["prompt"])["input_ids"]
    assert record["response_ids"] == tok('"Emma"', add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
