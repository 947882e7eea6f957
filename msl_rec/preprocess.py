"""``msl-rec-preprocess``: raw Amazon-2014 reviews + metadata -> BIGRec windows (see
:mod:`msl_rec.data.preprocess` for the exact steps).

    msl-rec-preprocess reviews_file=reviews_Toys_and_Games_5.json.gz \\
        meta_file=meta_Toys_and_Games.json.gz output_dir=data/toy

A non-empty ``output_dir`` is refused unless ``overwrite=true`` (and even then if it holds files other
than the four outputs, such as a ``train_sample.csv`` of the old data). Each step logs a line with its
counts and time; ``--help`` lists this command's options (``hydra.help`` in configs/preprocess.yaml).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from msl_rec.data.preprocess import preprocess
from msl_rec.utils.config import CONFIG_DIR


def run(cfg: DictConfig) -> dict[str, int]:
    # imported here: msl_rec.data pulls in torch and Lightning, which `--help` does not need

    counts = preprocess(cfg.reviews_file, cfg.meta_file, cfg.output_dir, k_core_min=cfg.k_core,
                        window=cfg.window, split=list(cfg.split), overwrite=cfg.overwrite)
    print(f"wrote {cfg.output_dir}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return counts


@hydra.main(config_path=CONFIG_DIR, config_name="preprocess", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
