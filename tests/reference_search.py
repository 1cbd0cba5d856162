"""Independent, loop-based NumPy reference of OpenNMT-tf 2.32's dynamic decoding.

This module is a test oracle. It is written apart from the vectorized search in
``jaxformer`` and deliberately shares no code with it: plain Python loops over
steps, batch entries and rows, float32 arithmetic where OpenNMT-tf uses float32.
It covers GreedySearch and BeamSearch with the BestSampler, the length and
coverage penalties, ``min_length`` / ``max_length``, attention history, and two
ways of returning results:

* ``compat=None`` (default, corrected): the cumulative log-prob travels with its
  hypothesis; each token's attention is that of the row that generated it; every
  returned field describes the same hypothesis, best first by score; a batch entry
  whose hypotheses have all finished is frozen (not re-scored while other entries
  run), so an entry's result does not depend on its batch.
* ``compat="opennmt-tf"``: what OpenNMT-tf 2.32 returns, its three defects included
  (old-row cumulative log-prob for a moved finished hypothesis; attention through
  ``gather_tree_from_array`` with the last step dropped; log-probs in the row order
  after the last step while ids are backtracked from each entry's max length).

Row layout is OpenNMT-tf's: ``row = b * W + w``. ``toy_model`` builds the small
deterministic stateful model described in the project's toy-model notes.
"""

import numpy as np

F32 = np.float32
_FMAX = np.finfo(np.float32).max
_FMIN = np.finfo(np.float32).min
_EOS_PENALTY = F32(-1e7)


# --------------------------------------------------------------------------- helpers


def _log_softmax(row):
    """float32 log-softmax of one row, shifted by its max for stability."""
    with np.errstate(over="ignore"):  # FMIN - FMAX overflows to -inf, as in TF
        shifted = (row - row.max()).astype(F32)
    return (shifted - np.log(np.sum(np.exp(shifted), dtype=F32))).astype(F32)


def _top_k(values, k):
    """Indices of the k largest values, best first; ties go to the lower index."""
    return np.argsort(-values, kind="stable")[:k]


def _gather_tree(step_ids, parents, max_lens, end_token):
    """Backtrack [T, B, W] step ids through beam parents, like tfa's gather_tree.

    Each beam w of entry b is followed back from time ``max_lens[b] - 1``, taking w
    as a row index at that time. Positions from ``max_lens[b]`` on, and every
    position after the first ``end_token``, become ``end_token``.
    """
    T, B, W = step_ids.shape
    out = np.full((T, B, W), end_token, np.int32)
    for b in range(B):
        L = min(int(max_lens[b]), T)
        for w in range(W):
            if L <= 0:
                continue
            beam = w
            for t in range(L - 1, -1, -1):
                out[t, b, w] = step_ids[t, b, beam]
                beam = parents[t, b, beam]
            ended = False
            for t in range(L):
                if ended:
                    out[t, b, w] = end_token
                elif out[t, b, w] == end_token:
                    ended = True
    return out


# --------------------------------------------------------------------------- search


def reference_decode(
    step_fn,
    start_ids,
    end_id,
    initial_state,
    *,
    beam_size=1,
    length_penalty=0.0,
    coverage_penalty=0.0,
    max_length,
    min_length=0,
    attention_size=None,
    return_attention=False,
    compat=None,
    strategy="auto",
):
    """Run greedy or beam search (BestSampler) the way OpenNMT-tf 2.32 does.

    step_fn(ids int32[R], step int, state) -> (logits [R, V], state, attention [R, S] | None)
    strategy: "auto" (greedy when beam_size == 1, else beam), "greedy" or "beam"
    (BeamSearch even for beam_size 1). Returns a dict of ids [B, W, max_length],
    lengths [B, W], log_probs [B, W], scores [B, W], attention [B, W, max_length, S]
    or None, steps_run.
    """
    if compat not in (None, "opennmt-tf"):
        raise ValueError(f"unknown compat mode {compat!r}")
    if strategy not in ("auto", "greedy", "beam"):
        raise ValueError(f"unknown strategy {strategy!r}")
    if coverage_penalty != 0 and attention_size is None:
        raise ValueError("coverage_penalty needs attention_size")
    # Several end ids (a tuple): any of them ends a hypothesis; the first is forced afterwards.
    end_ids = tuple(end_id) if isinstance(end_id, tuple | list) else (end_id,)
    end_id = end_ids[0]
    greedy = strategy == "greedy" or (strategy == "auto" and beam_size == 1)
    if greedy and beam_size != 1:
        raise ValueError("greedy search has a single hypothesis per entry")
    opennmt = compat == "opennmt-tf"
    use_coverage = not greedy and coverage_penalty != 0

    start_ids = np.asarray(start_ids, np.int32)
    B, W = start_ids.shape[0], (1 if greedy else beam_size)
    R = B * W

    # Tile: rows [b0w0, b0w1, ..., b1w0, ...].
    inputs = np.repeat(start_ids, W)  # int32 [R]
    state = {k: np.repeat(np.asarray(v), W, axis=0) for k, v in (initial_state or {}).items()}
    finished = np.zeros(R, bool)  # bool [R]
    cum = np.zeros(R, F32)  # float32 [R]
    if not greedy:
        for r in range(R):
            cum[r] = 0.0 if r % W == 0 else -np.inf  # only beam 0 is alive at first
    seq_lens = np.zeros(R, np.int32)  # int32 [R], counts EOS, frozen once finished
    acc = np.zeros((R, attention_size), F32) if use_coverage else None
    last_scores = cum.copy()

    # Per-step history, every array indexed by the row order after that step
    # (attention: by the row order before it, i.e. by generating row).
    hist = {"words": [], "beam_ids": [], "parent_rows": [], "attn": []}

    step = 0
    while step < max_length and not finished.all():
        out = step_fn(inputs.copy(), step, state)
        logits, new_state = np.asarray(out[0], F32), out[1]
        attn = out[2] if len(out) > 2 else None
        if attn is not None:
            attn = np.asarray(attn, F32)
        if (use_coverage or return_attention) and attn is None:
            raise ValueError("the step function returned no attention")
        V = logits.shape[1]

        # Forbid EOS before min_length; afterwards finished rows must emit EOS at
        # log-prob 0 (OpenNMT-tf's one-hot of float32 max / min).
        log_probs = np.empty((R, V), F32)
        for r in range(R):
            row = logits[r].copy()
            if step < min_length:
                for e in end_ids:
                    row[e] = row[e] + _EOS_PENALTY
            elif finished[r]:
                row = np.full(V, _FMIN, F32)
                row[end_id] = _FMAX
            log_probs[r] = _log_softmax(row)

        words = np.empty(R, np.int32)
        beam_ids = np.zeros(R, np.int32)
        parent_rows = np.arange(R)
        new_cum = np.empty(R, F32)
        step_scores = np.empty(R, F32)
        if greedy:
            for r in range(R):
                words[r] = _top_k(log_probs[r], 1)[0]
                new_cum[r] = cum[r] + log_probs[r, words[r]]
            step_scores[:] = new_cum
        else:
            if use_coverage:  # accumulate only for rows still running before this step
                acc_now = np.empty_like(acc)
                for r in range(R):
                    acc_now[r] = acc[r] + attn[r] * F32(0.0 if finished[r] else 1.0)
            total = np.empty((R, V), F32)
            scores = np.empty((R, V), F32)
            for r in range(R):
                total[r] = log_probs[r] + cum[r]
                scores[r] = total[r]
                if length_penalty != 0:
                    lp = ((F32(5.0) + F32(seq_lens[r] + 1)) / F32(6.0)) ** F32(length_penalty)
                    scores[r] = scores[r] / F32(lp)
                if use_coverage:
                    a = np.where(acc_now[r] == 0.0, F32(1.0), acc_now[r]).astype(F32)
                    penalty = np.sum(np.log(np.minimum(a, F32(1.0))), dtype=F32)
                    penalty = penalty * F32(1.0 if finished[r] else 0.0)
                    scores[r] = scores[r] + F32(coverage_penalty) * penalty
            for b in range(B):
                if not opennmt and finished[b * W : (b + 1) * W].all():
                    # Corrected: an entry whose hypotheses have all finished stays as it is
                    # (EOS from its own rows, same log-probs, scores and coverage), as it would
                    # alone. OpenNMT-tf re-scores it while other entries run.
                    for j in range(W):
                        r = b * W + j
                        words[r], beam_ids[r], parent_rows[r] = end_id, j, r
                        new_cum[r], step_scores[r] = cum[r], last_scores[r]
                    continue
                flat = scores[b * W : (b + 1) * W].reshape(-1)  # [W*V]
                for j, pick in enumerate(_top_k(flat, W)):
                    r = b * W + j
                    beam_ids[r], words[r] = pick // V, pick % V
                    parent_rows[r] = b * W + beam_ids[r]
                    new_cum[r] = total[parent_rows[r], words[r]]
                    step_scores[r] = flat[pick]
            grown = np.where(finished, seq_lens, seq_lens + 1).astype(np.int32)
            seq_lens = grown[parent_rows]
            if use_coverage:
                acc = acc_now[parent_rows]
            new_state = {k: np.asarray(v)[parent_rows] for k, v in new_state.items()}

        # finished before this step's token, in the new row order
        moved_finished = finished[parent_rows]
        # OpenNMT-tf keeps the cum of the row a finished hypothesis moves *into*;
        # the corrected search keeps the cum of the hypothesis itself.
        kept = cum if opennmt else cum[parent_rows]
        cum = np.where(moved_finished, kept, new_cum).astype(F32)
        finished = moved_finished | np.isin(words, end_ids)
        last_scores = step_scores
        for key, value in zip(hist, (words, beam_ids, parent_rows, attn), strict=True):
            hist[key].append(value)
        state, inputs = new_state, words
        step += 1

    T = step
    S = hist["attn"][0].shape[1] if (return_attention and T > 0) else (attention_size or 0)
    ids = np.full((B, W, max_length), end_id, np.int32)
    lengths = np.zeros((B, W), np.int32)
    attention = np.zeros((B, W, max_length, S), F32) if return_attention else None
    result = dict(
        ids=ids,
        lengths=lengths,
        log_probs=cum.reshape(B, W).copy(),
        scores=(cum if greedy else last_scores).reshape(B, W).copy(),
        attention=attention,
        steps_run=T,
    )
    if opennmt:
        _finalize_opennmt(result, hist, seq_lens, greedy, end_id, B, W)
        return result

    # Corrected finalize: follow each final row back through its generating rows.
    for b in range(B):
        for w in range(W):
            row, tokens, token_attn = b * W + w, [], []
            for t in range(T - 1, -1, -1):
                tokens.append(hist["words"][t][row])
                row = hist["parent_rows"][t][row]  # the row that generated this token
                if return_attention:
                    token_attn.append(hist["attn"][t][row])
            tokens.reverse()
            token_attn.reverse()
            eos = [t for t, tok in enumerate(tokens) if tok in end_ids]
            lengths[b, w] = eos[0] if eos else T
            kept = eos[0] + 1 if eos else T  # the tokens up to and including EOS
            ids[b, w, :kept] = tokens[:kept]
            if return_attention:
                for t in range(kept):
                    attention[b, w, t] = token_attn[t]
        order = np.argsort(-result["scores"][b], kind="stable")  # best first
        for key in ("ids", "lengths", "log_probs", "scores", "attention"):
            if result[key] is not None:
                result[key][b] = result[key][b][order]
    return result


def _finalize_opennmt(result, hist, seq_lens, greedy, end_id, B, W):
    """Fill ids / lengths / attention in place exactly as OpenNMT-tf 2.32 finalizes."""
    ids, lengths, attention, T = (result[k] for k in ("ids", "lengths", "attention", "steps_run"))
    hist_words, hist_attn = hist["words"], hist["attn"]
    if T == 0:
        return
    if greedy:
        for b in range(B):
            for t in range(T):
                ids[b, 0, t] = hist_words[t][b]
            lengths[b, 0] = int(np.sum(ids[b, 0, :T] != end_id))
            if attention is not None:
                for t in range(T - 1):  # the last step is dropped
                    attention[b, 0, t] = hist_attn[t][b]
        return
    step_ids = np.stack(hist_words).reshape(T, B, W)
    parents = np.stack(hist["beam_ids"]).reshape(T, B, W)
    max_lens = [int(seq_lens[b * W : (b + 1) * W].max()) for b in range(B)]
    tree = _gather_tree(step_ids, parents, max_lens, end_id)  # [T, B, W]
    for b in range(B):
        for w in range(W):
            ids[b, w, :T] = tree[:, b, w]
            lengths[b, w] = int(np.sum(tree[:, b, w] != end_id))
    if attention is None:
        return
    # gather_tree_from_array: backtrack beam indices from max(ids lengths), with a
    # never-matching end token, and keep the identity beam at t >= own length.
    beam_index = np.tile(np.arange(W, dtype=np.int32), (T, B, 1))
    sorted_beams = _gather_tree(beam_index, parents, lengths.max(axis=1), W + 1)
    for b in range(B):
        for w in range(W):
            for t in range(T - 1):  # the last step is dropped
                beam = sorted_beams[t, b, w] if t < lengths[b, w] else w
                attention[b, w, t] = hist_attn[t][b * W + beam]


# --------------------------------------------------------------------------- toy model


def toy_model(seed, *, V, S, M, T_max, B, tie_round=False, eos_id=None, eos_bias=0.0):
    """The shared deterministic stateful toy model (float32).

    Parameters are drawn from ``np.random.default_rng(seed)`` in this order:
    logit_table [T_max, V, V], bonus [M, V], att_table [T_max, V, S] (standard
    normal, cast to float32), then src_len int32 [B] uniform in 1..S. With
    ``tie_round`` the three tables are rounded to multiples of 0.5 (exact ties);
    then ``eos_bias`` is added to ``logit_table[..., eos_id]``.
    Returns (step_fn, initial_state, params).
    """
    rng = np.random.default_rng(seed)
    logit_table = rng.standard_normal((T_max, V, V)).astype(F32)
    bonus = rng.standard_normal((M, V)).astype(F32)
    att_table = rng.standard_normal((T_max, V, S)).astype(F32)
    src_len = rng.integers(1, S + 1, size=B).astype(np.int32)
    if tie_round:
        logit_table, bonus, att_table = (
            (np.round(x * 2) / 2).astype(F32) for x in (logit_table, bonus, att_table)
        )
    if eos_id is not None:
        logit_table[..., eos_id] += F32(eos_bias)
    params = dict(logit_table=logit_table, bonus=bonus, att_table=att_table, src_len=src_len)

    def step_fn(ids, step, state):
        ids = np.asarray(ids, np.int32)
        h, lens = state["h"], state["src_len"]
        logits = (logit_table[int(step), ids] + bonus[h % M]).astype(F32)  # [R, V]
        raw = att_table[int(step), ids]  # [R, S]
        attention = np.zeros(raw.shape, F32)
        for r in range(ids.shape[0]):
            valid = raw[r, : lens[r]]
            e = np.exp(valid - valid.max()).astype(F32)
            attention[r, : lens[r]] = e / np.sum(e, dtype=F32)  # masked columns stay 0.0
        new_h = ((h * 3 + ids + 1) % M).astype(np.int32)
        return logits, {"h": new_h, "src_len": lens}, attention

    initial_state = {"h": np.zeros(B, np.int32), "src_len": src_len}
    return step_fn, initial_state, params
