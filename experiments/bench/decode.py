"""Constrained beam search vs transformers' ``generate(prefix_allowed_tokens_fn=...)`` on SmolLM2-135M.

``python -m experiments.bench.decode``: Books prompts from the last rows of ``valid.csv``, 10 beams,
batches of 4. Each implementation runs in its own subprocess (so max RSS is its own); the parent
prints seconds per user, peak memory and the speed-up. Both sides use ``BENCH_THREADS`` torch threads
(default 1; ``OMP_NUM_THREADS`` is set to match in the children). ``python -m experiments.bench.decode ours``
runs just our side; ``ours-gather`` times our old path (full KV cache re-gathered per step). Ours also runs in ``cbs`` mode on the
transformers users and must return the same titles (a live check of the exactness tests).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BOOKS = ROOT / "data" / "books"
INSTRUCTION = "Given a list of books the user has read before, please recommend a new book that the user likes to the user."
INPUT_PREFIX = "The user has read the following books before: "
NUM_BEAMS, BATCH, OURS_USERS, HF_USERS, MAX_NEW = 10, 4, 8, 4, 64
THREADS = int(os.environ.get("BENCH_THREADS", "1"))


def books_prompts(n_users: int):
    """(catalog, samples, prompt ids) of the last ``n_users`` Books valid users (SmolLM2)."""
    from msl_rec.data.catalog import ItemCatalog, load_titles
    from msl_rec.data.io import read_samples
    from msl_rec.data.prompts import PromptBuilder
    from msl_rec.data.tokenizers import load_gguf_tokenizer

    tok = load_gguf_tokenizer()
    titles = load_titles(BOOKS / "id2name4Rec.json", allow_empty_titles=True)
    catalog = ItemCatalog(titles, tok)
    samples = read_samples(BOOKS / "valid.csv")[-n_users:]
    builder = PromptBuilder(tok, titles, INSTRUCTION, INPUT_PREFIX, cutoff_len=1024)
    return catalog, samples, builder.build_batch([s.history for s in samples], [MAX_NEW] * len(samples))


def setup(n_users: int):
    import torch
    from transformers import AutoModelForCausalLM

    from msl_rec.data.tokenizers import smollm2_gguf_path

    torch.set_num_threads(THREADS)
    catalog, samples, prompts = books_prompts(n_users)
    batches = []
    for i in range(0, len(prompts), BATCH):
        chunk, rows = prompts[i:i + BATCH], samples[i:i + BATCH]
        width = max(map(len, chunk))
        batches.append({
            "prompt_input_ids": torch.tensor([[0] * (width - len(p)) + p for p in chunk]),
            "prompt_attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk]),
            "target_ids": torch.tensor([s.target for s in rows]),
            "user_ids": torch.tensor([s.user_id for s in rows]),
        })
    p = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name).eval()
    return model, catalog, batches


def run_ours(shared_prompt: bool | None = None) -> dict:
    import torch

    from msl_rec.decoding import ConstrainedBeamSearch
    from msl_rec.models.inference import CausalLMInference

    model, catalog, batches = setup(OURS_USERS)
    dec = ConstrainedBeamSearch(catalog, num_beams=NUM_BEAMS, mask="before", max_new_tokens=MAX_NEW,
                                shared_prompt=shared_prompt)
    with torch.no_grad():
        t0 = time.perf_counter()
        lm = CausalLMInference(shared_prompt=shared_prompt).bind(model)
        for b in batches:
            dec.rank(lm, b)
        secs = time.perf_counter() - t0
        after = ConstrainedBeamSearch(catalog, num_beams=NUM_BEAMS, mask="after", max_new_tokens=MAX_NEW,
                                      shared_prompt=shared_prompt)
        # the transformers side runs the last HF_USERS users (setup takes the last rows of valid.csv)
        cbs = [r for b in batches[len(batches) - HF_USERS // BATCH:] for r in after.rank(lm, b)]
    return {"secs_per_user": secs / OURS_USERS, "users": OURS_USERS,
            "cbs_titles": [[s for s, _ in r] for r in cbs], "cbs_scores": [[sc for _, sc in r] for r in cbs]}


def run_hf() -> dict:
    import torch

    model, catalog, batches = setup(HF_USERS)
    titles, scores, secs = [], [], 0.0
    for b in batches:
        width = b["prompt_input_ids"].shape[1]

        def allowed(_, sent, width=width):
            return catalog.allowed(sent[width:].tolist()) or [catalog.eos_id]

        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=b["prompt_input_ids"], attention_mask=b["prompt_attention_mask"],
                                 num_beams=NUM_BEAMS, num_return_sequences=NUM_BEAMS, do_sample=False,
                                 prefix_allowed_tokens_fn=allowed, max_new_tokens=MAX_NEW,
                                 eos_token_id=catalog.eos_id, pad_token_id=0, output_scores=True,
                                 return_dict_in_generate=True)
        secs += time.perf_counter() - t0
        seqs, sc = out.sequences[:, width:].tolist(), out.sequences_scores.tolist()
        for u in range(len(b["user_ids"])):
            rows = [(seqs[j], sc[j]) for j in range(u * NUM_BEAMS, (u + 1) * NUM_BEAMS) if sc[j] > -1e5]
            titles.append([catalog.sequence_at(catalog.node_of(s[: s.index(catalog.eos_id) + 1])) for s, _ in rows])
            scores.append([x for _, x in rows])
    return {"secs_per_user": secs / HF_USERS, "users": HF_USERS, "titles": titles, "scores": scores}


def child(which: str) -> None:
    res = run_hf() if which == "hf" else run_ours(False if which == "ours-gather" else None)
    res["threads"] = __import__("torch").get_num_threads()
    res["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res), flush=True)


def spawn(which: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "BENCH_THREADS": str(THREADS)}
    out = subprocess.run([sys.executable, "-m", "experiments.bench.decode", which], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    if len(sys.argv) > 1:
        return child(sys.argv[1])
    ours, hf = spawn("ours"), spawn("hf")
    same = ours["cbs_titles"] == hf["titles"] and all(
        abs(a - b) < 1e-3 for x, y in zip(ours["cbs_scores"], hf["scores"]) for a, b in zip(x, y))
    print(f"SmolLM2-135M, Books, {NUM_BEAMS} beams, batches of {BATCH}, CPU, "
          f"torch threads: ours {ours['threads']}, transformers {hf['threads']}")
    print(f"  ours cbs_masked : {ours['secs_per_user']:.2f} s/user ({ours['users']} users), "
          f"max RSS {ours['max_rss_mb']:.0f} MB")
    print(f"  transformers    : {hf['secs_per_user']:.2f} s/user ({hf['users']} users), "
          f"max RSS {hf['max_rss_mb']:.0f} MB")
    print(f"  speed-up        : {hf['secs_per_user'] / ours['secs_per_user']:.1f}x (target >= 5x)")
    print(f"  ours cbs == transformers on its {hf['users']} users (titles and scores): {same}")


if __name__ == "__main__":
    main()
