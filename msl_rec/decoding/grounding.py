"""BIGRec's grounding (Bao et al. 2023, "A Bi-Step Grounding Paradigm"): generate freely, then map the
generated text to the nearest catalog titles in the LLM's hidden space.

1. **Generate** without the trie: beam search over the whole vocabulary, ``num_beams`` beams, until EOS
   or ``max_new_tokens``, as transformers' ``generate(num_beams=K, do_sample=False)`` does it (the rules
   of :mod:`msl_rec.decoding.beam` with every token a candidate; a beam cut off at ``max_new_tokens`` is
   a finished hypothesis too, as in ``generate``). The best hypothesis is the user's generated text.
2. **Embed** the generated text and every catalog title: the final hidden state (after the last norm)
   at the text's last token, the text run on its own (:meth:`~msl_rec.models.inference.LMRunner.text_embeddings`).
   The titles' embeddings are computed once per weights version.
3. **Rank** every catalog sequence by the L2 distance of its title's embedding to the generated text's,
   smallest first (ties: smaller sequence index first); score = -distance.

What BIGRec's code (github.com/SAI990323/BIGRec) does, and where this differs:

* ``inference.py:92-124``: ``generate`` with ``num_beams=4``, ``num_return_sequences=4``,
  ``max_new_tokens=128``, beam search (``temperature=0``, no sampling), length penalty 1, no early
  stopping, fp16, left-padded batches of 8; the output is decoded (special tokens skipped) and cut
  after ``"Response:\\n"``. Here: ``num_beams`` 10 by default (the paper's), ``max_new_tokens`` the
  catalog's longest response, float32, each prompt unpadded (so a user's text does not depend on the
  batch); the generated token ids are used directly (no decode/re-encode).
* ``data/movie/evaluate.py:46`` keeps the best beam (``predict[0]``) and strips its quotes;
  ``data/embedding.ipynb`` (cell 2) strips spaces and quotes from the titles. Here both texts keep the
  quotes of the response format (``'"' + title + '"'``) and only a final EOS is dropped: a generated
  text that is a title's response has exactly that title's embedding (distance 0). The tokens cannot be
  unquoted without the tokenizer, as a quote may merge with its neighbour (``"The``, ``!"``).
* ``data/movie/evaluate.py:19-25, 55-61`` and ``data/embedding.ipynb`` (cells 1, 3):
  ``hidden_states[-1][:, -1, :]`` (the final norm's output at the last position) of the *base* LLaMA (no
  LoRA loaded), fp16, over left-padded batches of 16 run without position ids (so a text's positions
  shift with the padding its batch needs), each text after the BOS the LLaMA tokenizer adds;
  ``evaluate.py:65`` ``torch.cdist(p=2)``, ``:69`` ``argsort`` over all items. Here: the same hidden
  state and distance; ``embedding_model="base"`` (the default) embeds with the adapter switched off,
  as BIGRec (for an S-DPO run: the SFT-merged model it starts from), ``"tuned"`` with the evaluated
  model; float32; no BOS is added (the texts are the response tokens); no padding (a forward holds
  texts of one length; each generated text runs alone); the distance is computed exactly per user
  (no ``cdist`` matrix-product shortcut) and sorted stably.

Search only, like :class:`~msl_rec.decoding.beam.ConstrainedBeamSearch`: the model is driven through
the inference runner it is handed (``lm.beam_rows``, ``BeamRows.top_tokens``/``advance``,
``lm.text_embeddings``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from msl_rec.decoding.base import LMDecoder, Ranking
from msl_rec.decoding.beam import EARLY_STOPPING, users_going_on
from msl_rec.utils.precision import eval_dtype

EMBEDDING_MODELS = ("base", "tuned")
TEXTS = ("title", "response")
Hypothesis = tuple[float, list[int]]
"""A finished beam: ``(sum of log-probs / generated_len ** length_penalty, generated token ids)``."""


class Grounding(LMDecoder):
    """BIGRec's free generation + L2 grounding to the catalog (module docstring).

    Args:
        catalog: the :class:`~msl_rec.data.catalog.ItemCatalog` whose titles are ranked.
        num_beams: beams of the free generation.
        length_penalty: finished score = sum of log-probs / generated_len ** length_penalty.
        max_new_tokens: generation length cap (EOS included).
        early_stopping: transformers' ``early_stopping`` (False, True or "never").
        num_results: ranked sequences returned per user; None: ``max(top_k)``.
        embedding_model: ``"base"`` embeds with the LoRA adapter switched off (BIGRec); ``"tuned"`` with
            the model as evaluated.
        top_k: the cut-offs the decoder is evaluated at; each must be <= ``num_results``.
        shared_prompt, dtype, share_preamble: the inference runner's settings, as for
            :class:`~msl_rec.decoding.beam.ConstrainedBeamSearch`.
        text: ``"title"`` (BIGRec): titles and generations embedded as bare text (quotes stripped) with the
            tokenizer's special tokens (LLaMA's BOS); ``"response"``: as the quoted response tokens, EOS dropped.
        embedding_cache: a folder where the titles' embeddings are also kept, keyed by the embedding
            weights' content (:meth:`~msl_rec.models.inference.LMRunner.text_embeddings` ``store``); None: in
            memory only.

    Attributes:
        mask: ``"after"``: the evaluation's ``target_logp`` is the full-softmax log-probability, the
            distribution this decoder generates from (no token is masked).
    """

    needs_model = True
    mask = "after"
    constrained = False  # every title is ranked, whatever the generation's length cap

    def __init__(self, catalog, num_beams: int = 10, length_penalty: float = 1.0, max_new_tokens: int = 64,
                 early_stopping: bool | str = False, num_results: int | None = None, embedding_model: str = "base",
                 top_k: Sequence[int] = (1, 5, 10), shared_prompt: bool | None = None, dtype: str = "float32",
                 share_preamble: bool = True, embedding_cache: str | None = None, text: str = "title"):
        if text not in TEXTS:
            raise ValueError(f"decoder.text must be one of {TEXTS}, got {text!r}")
        if early_stopping not in EARLY_STOPPING:
            raise ValueError(f"decoder.early_stopping must be one of {EARLY_STOPPING}, got {early_stopping!r}")
        if embedding_model not in EMBEDDING_MODELS:
            raise ValueError(f"decoder.embedding_model must be one of {EMBEDDING_MODELS}, got {embedding_model!r}")
        eval_dtype(dtype, "decoder.dtype")
        if num_beams < 1 or max_new_tokens < 1:
            raise ValueError("decoder.num_beams and decoder.max_new_tokens must be >= 1")
        self.top_k = tuple(int(k) for k in top_k)
        n_seqs = len(catalog.sequences)
        self.num_results = int(num_results) if num_results is not None else max(self.top_k, default=n_seqs)
        if not 1 <= self.num_results <= n_seqs:
            raise ValueError(f"decoder.num_results={self.num_results}: must be between 1 and the catalog's "
                             f"{n_seqs} distinct titles")
        if self.top_k and max(self.top_k) > self.num_results:
            raise ValueError(f"decoder.top_k {list(self.top_k)} needs num_results >= {max(self.top_k)}, "
                             f"got {self.num_results}")
        self.catalog = catalog
        self.num_beams = int(num_beams)
        self.length_penalty = float(length_penalty)
        self.max_new_tokens = int(max_new_tokens)
        self.early_stopping = early_stopping
        self.embedding_model = embedding_model
        self.shared_prompt = shared_prompt
        self.dtype = dtype
        self.share_preamble = bool(share_preamble)
        self.embedding_cache = embedding_cache
        self.eos_id = int(catalog.eos_id)
        self.text = text
        # what each sequence is embedded as
        self.titles = (catalog.bare_title_ids() if text == "title" else [self.text_of(seq) for seq in catalog.sequences])

    def __repr__(self) -> str:
        return (f"Grounding(num_beams={self.num_beams}, length_penalty={self.length_penalty}, "
                f"max_new_tokens={self.max_new_tokens}, embedding_model={self.embedding_model!r}, "
                f"num_results={self.num_results}, dtype={self.dtype!r})")

    @property
    def compute_dtype(self) -> str:
        """The dtype of the weights and activations while decoding and embedding."""
        return self.dtype

    def text_of(self, tokens: Sequence[int]) -> list[int]:
        """The tokens a generated response is embedded as. ``text="title"`` (BIGRec): decoded, its quotes
        stripped, tokenised again with the tokenizer's special tokens (:meth:`ItemCatalog.bare_text_ids`).
        ``"response"``: the response tokens themselves without the final EOS (a response that is EOS alone is
        that one token), so a generated title's response is exactly that title's text."""
        if self.text == "title":
            return self.catalog.bare_text_ids(tokens)
        tokens = list(tokens)
        if tokens and tokens[-1] == self.eos_id and len(tokens) > 1:
            tokens = tokens[:-1]
        return tokens or [self.eos_id]

    # ------------------------------------------------------------------ search
    def search(self, lm, prompts) -> list[Ranking]:
        """Per user: the ``num_results`` catalog sequences nearest its generated text, ``(index, -L2)``."""
        generated = [hyps[0][1] for hyps in self.generate(lm, prompts)]
        return self.ground(lm, generated)

    def ground(self, lm, generated: Sequence[Sequence[int]]) -> list[Ranking]:
        """Per generated response (token ids): the nearest catalog sequences by L2 distance of the
        embeddings, ``(sequence index, -distance)``, nearest first, ties by smaller index."""
        base = self.embedding_model == "base"
        titles = lm.text_embeddings(self.titles, base=base, cache_key="catalog titles",
                                    store=self.embedding_cache)  # (S, d)
        # one text per forward: a user's embedding is computed on its own tokens only
        queries = lm.text_embeddings([self.text_of(g) for g in generated], base=base, batch_size=1)  # (B, d)
        out = []
        for query in queries:
            dist = torch.linalg.vector_norm(titles - query, dim=-1)  # (S,), per user: no batch-shaped rounding
            order = torch.sort(dist, stable=True).indices[: self.num_results]
            out.append([(int(s), -float(d)) for s, d in zip(order.tolist(), dist[order].tolist())])
        return out

    def generate(self, lm, prompts) -> list[list[Hypothesis]]:
        """Free beam search after the encoded prompts (``lm.encode_prompts``): per user, its finished
        hypotheses, best first, at most ``num_beams`` (``generate(num_return_sequences=num_beams)``).

        Each step mirrors transformers' ``_beam_search``: the top ``2K`` (beam, token) candidates by
        ``beam score + log p(token)``; among the top ``K`` of them an EOS, or any candidate at the last
        step, finishes a hypothesis; the best ``K`` non-EOS candidates go on; a user stops as
        :class:`~msl_rec.decoding.beam.ConstrainedBeamSearch` describes (``early_stopping``)."""
        K, n_users = self.num_beams, len(prompts)
        rows = lm.beam_rows(prompts)
        users = np.arange(n_users)        # batch index of each live user
        row_user = np.arange(n_users)     # live-user index of each row (rows grouped by user, best first)
        scores = torch.zeros(n_users, device=rows.device)  # (rows,) sum of log-probs so far
        tokens: list[list[int]] = [[] for _ in range(n_users)]  # each row's generated tokens
        finished: list[list[Hypothesis]] = [[] for _ in range(n_users)]
        for step in range(self.max_new_tokens):
            gen_len, last = step + 1, step + 1 == self.max_new_tokens
            logp, tok = rows.top_tokens(2 * K)  # (rows, c): a row's best tokens hold every top-2K candidate
            top_val, top_row, top_tok = self._top_per_user(scores[:, None] + logp, tok, row_user, len(users))
            valid = np.isfinite(top_val)
            is_eos = valid & (top_tok == self.eos_id)
            self._add_finished(finished, users, top_val, top_row, top_tok, tokens, (is_eos | (valid & last))[:, :K],
                               gen_len)
            if last:
                break
            cont = valid & ~is_eos
            cont &= np.cumsum(cont, axis=1) <= K
            cont &= self._users_going_on(finished, users, top_val, cont, gen_len)[:, None]
            if not cont.any():
                break
            keep = cont.any(axis=1)
            sel_user, sel_col = np.nonzero(cont)  # row-major: grouped by user, best first
            src, new_tok = top_row[sel_user, sel_col], top_tok[sel_user, sel_col]
            users, row_user = users[keep], (np.cumsum(keep) - 1)[sel_user]
            scores = torch.from_numpy(top_val[sel_user, sel_col]).to(rows.device)
            tokens = [tokens[r] + [t] for r, t in zip(src.tolist(), new_tok.tolist())]
            rows.advance(keep, row_user, src, new_tok)
        return [sorted(hyps, key=lambda h: -h[0]) for hyps in finished]

    def _top_per_user(self, cand: torch.Tensor, tok: torch.Tensor, row_user: np.ndarray, n_users: int):
        """Per user, its top ``2K`` candidates over all its rows, best first.

        Args:
            cand: (R, c) candidate scores (beam score + log p), tok: (R, c) their tokens.
        Returns host arrays ``(score, row, token)``, each (U, 2K); missing ones score -inf."""
        device, (n_rows, c) = cand.device, cand.shape
        count = np.bincount(row_user, minlength=n_users)
        start = np.cumsum(count) - count
        slot = np.arange(n_rows) - start[row_user]  # a row's place among its user's rows
        grid = cand.new_full((n_users, int(count.max()) * c), -torch.inf)
        cols = torch.from_numpy(slot[:, None] * c + np.arange(c)).to(device)
        grid[torch.from_numpy(row_user).to(device)[:, None], cols] = cand
        top_val, top_pos = torch.topk(grid, k=min(2 * self.num_beams, grid.shape[1]), dim=1)
        t_start = torch.from_numpy(start).to(device)[:, None]
        top_row = (t_start + top_pos // c).clamp_max(n_rows - 1)  # -inf slots point anywhere valid
        top_tok = tok[top_row, top_pos % c]
        return top_val.cpu().numpy(), top_row.cpu().numpy(), top_tok.cpu().numpy()

    def _add_finished(self, finished, users, top_val, top_row, top_tok, tokens, done, gen_len: int) -> None:
        """Candidates ``done`` (U, K) become finished hypotheses scored ``sum log p / gen_len **
        length_penalty``; each user keeps its best K (``_update_finished_beams``)."""
        denom = gen_len ** self.length_penalty
        for u, j in zip(*np.nonzero(done)):
            hyps = finished[users[u]]
            hyps.append((float(top_val[u, j]) / denom, tokens[top_row[u, j]] + [int(top_tok[u, j])]))
            if len(hyps) > self.num_beams:
                hyps.sort(key=lambda h: -h[0])
                del hyps[self.num_beams:]

    _users_going_on = users_going_on  # the stopping rule of the constrained search
