"""One multi-turn episode, token by token: who wrote each token and what the loss does with it.

A multi-turn trajectory (trustrl.rollout.trajectory) is one token sequence in which the policy's
turns and the environment's observations alternate; only ``response_mask`` says which is which.
This module splits an episode into ``Piece``s (one per token, in sequence order) and renders them
as HTML (for notebooks) or as plain text (terminals, logs, and the notebook's fallback):

    prompt       the first observation, rendered by the turn template (before the trajectory)
    policy       a token the policy sampled (response_mask 1): the only tokens in the loss
    observation  an environment observation rendered with the template's turn markers
    template     the end-of-turn token the template appends when a turn hits its token limit

Policy tokens can carry a trust-region status (``dropped``: the tokens a loss's mask blocks, e.g.
``inspection.blocked_tokens``); the other kinds are out of the loss whatever the mask says. The
module computes no mask itself: it shows the one it is given.
"""
from __future__ import annotations

import dataclasses
import html
from typing import Callable, Sequence

import numpy as np

KINDS = ("prompt", "policy", "observation", "template")
STATUSES = ("kept", "dropped", "out")  # policy tokens kept / dropped by the mask; out of the loss

# background per kind; a dropped policy token gets a red frame and a strike-through
COLOURS = {"prompt": "#e8e8e8", "policy": "#c6e9c6", "observation": "#cfe0f7",
           "template": "#f7e3b5"}
DROPPED_STYLE = "outline:2px solid #d62728;text-decoration:line-through;"


@dataclasses.dataclass(frozen=True)
class Piece:
    """One token of an episode: its id and text, who wrote it (KINDS), its turn (-1 for the
    prompt), its trajectory column (-1 for the prompt), its loss status (STATUSES; policy tokens
    are "kept" unless a mask drops them) and an optional note (the HTML tooltip)."""
    token_id: int
    text: str
    kind: str
    turn: int
    column: int
    status: str
    note: str = ""


def pieces(prompt_ids: Sequence[int], response_ids, response_mask, turn_index,
           decode_token: Callable[[int], str], *, eot: int | None = None, dropped=None,
           notes=None) -> list[Piece]:
    """The Pieces of one episode: its prompt tokens, then the trajectory columns up to its end.

    ``response_ids`` / ``response_mask`` / ``turn_index``: the episode's row [N] of the Rollout's
    response_tokens / response_mask and of Trajectories.turn_index (-1: after the end, dropped).
    ``eot``: the template's end-of-turn id; a non-policy ``eot`` right after a policy token that
    is not itself ``eot`` is the template's closing token (kind "template"); without ``eot``
    every non-policy column is an observation. ``dropped`` [N] bool: policy tokens the mask
    blocks; ``notes`` [N] str: tooltips."""
    ids, mask, turns = (np.asarray(a).reshape(-1) for a in (response_ids, response_mask,
                                                              turn_index))
    if not ids.shape == mask.shape == turns.shape:
        raise ValueError(f"response_ids {ids.shape}, response_mask {mask.shape} and turn_index "
                         f"{turns.shape} must have the same length")
    if dropped is not None:
        dropped = np.asarray(dropped, bool).reshape(-1)
        if dropped.shape != ids.shape:
            raise ValueError(f"dropped has shape {dropped.shape}, the trajectory {ids.shape}")
        if (dropped & (mask == 0)).any():
            bad = np.flatnonzero(dropped & (mask == 0)).tolist()
            raise ValueError(f"dropped marks non-policy columns {bad}: a mask can only drop "
                             "policy tokens (response_mask 1)")
    out = [Piece(int(t), decode_token(int(t)), "prompt", -1, -1, "out") for t in prompt_ids]
    for c in np.flatnonzero(turns >= 0):
        tid, note = int(ids[c]), "" if notes is None else str(notes[c])
        if mask[c] > 0:
            status = "dropped" if dropped is not None and dropped[c] else "kept"
            kind = "policy"
        else:
            status = "out"
            closes = (eot is not None and tid == eot and c > 0 and mask[c - 1] > 0
                      and int(ids[c - 1]) != eot)
            kind = "template" if closes else "observation"
        out.append(Piece(tid, decode_token(tid), kind, int(turns[c]), int(c), status, note))
    return out


def episode_pieces(rollout, traj, row: int, decode_token: Callable[[int], str], **kwargs):
    """``pieces`` of episode ``row`` of a multi-turn Rollout and its Trajectories (the prompt is
    the row's unpadded prompt_tokens); kwargs: eot, and dropped / notes as [N] rows."""
    prompt = np.asarray(rollout.prompt_tokens[row])[np.asarray(rollout.prompt_mask[row]) > 0]
    return pieces(prompt.tolist(), np.asarray(rollout.response_tokens[row]),
                  np.asarray(rollout.response_mask[row]), np.asarray(traj.turn_index[row]),
                  decode_token, **kwargs)


def observation_ids(pieces_: Sequence[Piece]) -> dict[int, list]:
    """{turn: the non-policy ids (template and observation tokens) that follow its policy
    tokens}, in order: what the environment (and the template) contributed after each turn."""
    out: dict[int, list] = {}
    for p in pieces_:
        if p.kind in ("observation", "template"):
            out.setdefault(p.turn, []).append(p.token_id)
    return out


def counts(pieces_: Sequence[Piece]) -> dict:
    """Tokens per kind and per policy status: {"prompt": n, ..., "kept": n, "dropped": n}."""
    out = {k: 0 for k in KINDS + ("kept", "dropped")}
    for p in pieces_:
        out[p.kind] += 1
        if p.kind == "policy":
            out[p.status] += 1
    return out


def _runs(pieces_: Sequence[Piece]):
    """Consecutive pieces of one (kind, turn), in order."""
    run: list[Piece] = []
    for p in pieces_:
        if run and (p.kind, p.turn) != (run[0].kind, run[0].turn):
            yield run
            run = []
        run.append(p)
    if run:
        yield run


def _visible(text: str) -> str:
    return text.replace("\n", "\u23ce").replace("\t", "\u21e5")


def to_text(pieces_: Sequence[Piece]) -> str:
    """Plain text: one line per run of one kind and turn, tokens separated by "|" (newlines as
    "⏎"), dropped policy tokens in [brackets]."""
    lines = []
    for run in _runs(pieces_):
        kind, turn = run[0].kind, run[0].turn
        label = kind if turn < 0 else f"{kind} t{turn}"
        toks = [f"[{_visible(p.text)}]" if p.status == "dropped" else _visible(p.text)
                for p in run]
        lines.append(f"{label:<15}|" + "|".join(toks) + "|")
    legend = ("policy tokens are in the loss ([x]: dropped by the mask); prompt, observation "
              "and template tokens are not")
    return "\n".join(lines + [legend])


_STATUS_WORDS = {"kept": "in the loss", "dropped": "dropped by the mask", "out": "out of the loss"}


def _span(p: Piece) -> str:
    # a 1px gap between tokens shows their boundaries within a run of one colour
    style = (f"background:{COLOURS[p.kind]};margin-right:1px;"
             + (DROPPED_STYLE if p.status == "dropped" else ""))
    where = "" if p.kind == "prompt" else f", turn {p.turn}, column {p.column}"
    title = f"{p.kind}{where}, id {p.token_id}: {_STATUS_WORDS[p.status]}"
    if p.note:
        title += f"; {p.note}"
    text = html.escape(p.text).replace("\n", "\u23ce\n")
    return (f'<span class="trustrl-{p.kind} trustrl-{p.status}" style="{style}" '
            f'title="{html.escape(title)}">{text}</span>')


def to_html(pieces_: Sequence[Piece]) -> str:
    """HTML: each token a <span> with classes ``trustrl-<kind> trustrl-<status>``, coloured by
    kind (dropped policy tokens framed in red and struck through), a tooltip with its turn,
    column, id and note, and a legend."""
    legend = " ".join(
        f'<span style="background:{COLOURS[k]};padding:0 4px">{k}</span>' for k in KINDS)
    legend += (f' <span style="background:{COLOURS["policy"]};{DROPPED_STYLE}padding:0 4px">'
               "policy, dropped by the mask</span>")
    body = "".join(_span(p) for p in pieces_)
    return (f'<div class="trustrl-trajectory"><div style="margin-bottom:4px">{legend}</div>'
            f'<div style="font-family:monospace;white-space:pre-wrap;line-height:1.6">{body}'
            "</div></div>")
