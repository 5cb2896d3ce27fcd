"""trustrl.analysis.trajectories on a hand-built two-turn episode: kinds, turns, mask status,
observation ids and both renderings."""
import re

import numpy as np
import pytest

from trustrl.analysis import trajectories as tr

EOT = 0
TEXT = {0: "<|eot|>", 1: "Q", 2: ":", 3: " 4", 4: "2", 5: "\nhigher", 6: "\nA:", 7: " 7"}
# turn 0: " 4" "2" capped, closed by the template's EOT, observation "\nhigher" "\nA:";
# turn 1: " 7" and the policy's own EOT; then padding (turn_index -1)
IDS = [3, 4, EOT, 5, 6, 7, EOT, 0]
MASK = [1, 1, 0, 0, 0, 1, 1, 0]
TURN = [0, 0, 0, 0, 0, 1, 1, -1]


def build(**kw):
    return tr.pieces([1, 2], IDS, MASK, TURN, TEXT.__getitem__, eot=EOT, **kw)


def test_pieces_kinds_turns_and_status():
    dropped = np.array([0, 1, 0, 0, 0, 0, 1, 0], bool)
    ps = build(dropped=dropped, notes=[f"n{i}" for i in range(8)])
    assert [p.kind for p in ps] == ["prompt"] * 2 + ["policy"] * 2 + ["template"] + [
        "observation"] * 2 + ["policy"] * 2  # the padding column is left out
    assert [p.turn for p in ps] == [-1, -1, 0, 0, 0, 0, 0, 1, 1]
    assert [p.column for p in ps] == [-1, -1, 0, 1, 2, 3, 4, 5, 6]
    assert [p.status for p in ps] == ["out"] * 2 + ["kept", "dropped"] + ["out"] * 3 + [
        "kept", "dropped"]
    assert ps[3].note == "n1" and ps[0].note == ""
    # the policy's own EOT (turn 1) is a policy token; the template's (turn 0) is not
    assert ps[-1].token_id == EOT and ps[-1].kind == "policy"
    assert tr.observation_ids(ps) == {0: [EOT, 5, 6]}
    assert tr.counts(ps) == {"prompt": 2, "policy": 4, "observation": 2, "template": 1,
                             "kept": 2, "dropped": 2}
    # without eot every non-policy column is an observation; without dropped all are kept
    plain = tr.pieces([1, 2], IDS, MASK, TURN, TEXT.__getitem__)
    assert [p.kind for p in plain].count("template") == 0
    assert tr.counts(plain)["kept"] == 4 and tr.counts(plain)["dropped"] == 0


def test_renderings_show_every_token_once_with_its_class():
    ps = build(dropped=np.array([0, 1, 0, 0, 0, 0, 0, 0], bool))
    page = tr.to_html(ps)
    classes = re.findall(r'<span class="trustrl-(\w+) trustrl-(\w+)"', page)
    assert classes == [(p.kind, p.status) for p in ps]
    assert "&lt;|eot|&gt;" in page and "<|eot|>" not in page  # escaped
    assert page.count("line-through") == 1 + 1  # the dropped token and the legend's sample
    assert "policy, turn 0, column 1, id 4: dropped by the mask" in page
    text = tr.to_text(ps).splitlines()
    assert text[:5] == ["prompt         |Q|:|", "policy t0      | 4|[2]|",
                        "template t0    |<|eot|>|", "observation t0 |\u23cehigher|\u23ceA:|",
                        "policy t1      | 7|<|eot|>|"]


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="same length"):
        tr.pieces([], IDS, MASK[:-1], TURN, TEXT.__getitem__)
    with pytest.raises(ValueError, match="can only drop policy tokens"):
        build(dropped=np.array([0, 0, 1, 0, 0, 0, 0, 0], bool))
