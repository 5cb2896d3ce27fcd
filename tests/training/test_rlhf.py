"""RLHF rewards (trustrl.training.rlhf): re-templating with the reward model's own tokenizer,
truncation counting, length-bucketed packing, shaping (normalisation, clipping, penalties), the
KL-to-reference term and the diagnostics, each against hand-computed values."""
import math

import numpy as np
import pytest

from trustrl.data.tokenizer import FALLBACK_TEMPLATES, train_bpe
from trustrl.training import rlhf


@pytest.fixture(scope="module")
def tokenizers():
    """Two different vocabularies: the policy's and the reward model's (with a chat
    template)."""
    texts = ["Write about zaku and tebi.", "zaku tebi mola rudi", "user: assistant: \n"] * 20
    policy = train_bpe(texts, 280, save_dir=None, split_digits=True)
    rm = train_bpe([t.upper() for t in texts] + texts, 320, save_dir=None, split_digits=False)
    rm.chat_template = FALLBACK_TEMPLATES["chatml"]
    return policy, rm


def test_render_uses_the_reward_models_template_with_the_assistant_turn(tokenizers):
    _, rm = tokenizers
    text = rlhf.render(rm, "Write about zaku.", "zaku tebi", "chat")
    assert text == ("<|im_start|>user\nWrite about zaku.<|im_end|>\n"
                    "<|im_start|>assistant\nzaku tebi<|im_end|>\n")  # no generation prompt
    assert rlhf.render(rm, "p", "r", "plain") == "p\n\nr"
    with pytest.raises(ValueError, match="reward_model.template='xml'.*chat"):
        rlhf.render(rm, "p", "r", "xml")


def test_policy_tokens_are_re_encoded_with_the_reward_models_tokenizer(tokenizers):
    policy, rm = tokenizers
    response = "zaku tebi mola"
    policy_ids = policy.encode(response)
    text = policy.decode(policy_ids)  # what TaskEnv.decode_responses hands over
    ids, truncated = rlhf.encode(rm, ["Write about zaku."], [text], max_length=512)
    assert ids[0] == rm.encode(rlhf.render(rm, "Write about zaku.", response))
    assert ids[0] != policy.encode(rlhf.render(rm, "Write about zaku.", response))
    assert not truncated.any()


def test_truncation_keeps_the_start_or_the_end_and_is_counted(tokenizers):
    _, rm = tokenizers
    full = rm.encode(rlhf.render(rm, "Write about zaku.", "zaku tebi mola rudi " * 4))
    short = rm.encode(rlhf.render(rm, "p", "zaku"))
    n = len(short) + 1
    assert len(full) > n
    ids, cut = rlhf.encode(rm, ["Write about zaku.", "p"], ["zaku tebi mola rudi " * 4, "zaku"],
                           max_length=n)
    assert cut.tolist() == [True, False]
    assert ids[0] == full[:n] and ids[1] == short
    ids, _ = rlhf.encode(rm, ["Write about zaku."], ["zaku tebi mola rudi " * 4], max_length=n,
                         truncation="left")
    assert ids[0] == full[-n:]
    with pytest.raises(ValueError, match="truncation='middle'.*right"):
        rlhf.encode(rm, ["p"], ["r"], max_length=8, truncation="middle")


def test_pack_sorts_by_length_and_pads_to_buckets_and_row_multiples():
    rows = [[1] * 5, [2] * 17, [3] * 2, [4] * 9, [5] * 16]
    batches = rlhf.pack(rows, pad_id=0, bucket=8, batch_size=2, row_multiple=4)
    assert [b[0].tolist() for b in batches] == [[2, 0], [3, 4], [1]]
    for idx, tokens, valid in batches:
        assert tokens.shape[0] == 4 and tokens.shape[1] % 8 == 0
        assert tokens.shape[1] == 8 * math.ceil(max(len(rows[i]) for i in idx) / 8)
        for r, i in enumerate(idx):
            assert tokens[r, :len(rows[i])].tolist() == rows[i]
            assert valid[r].sum() == len(rows[i]) and valid[r, :len(rows[i])].all()
        assert (valid[len(idx):].sum(1) == 1).all()  # padding rows: one valid pad token
    assert [b[1].shape[1] for b in batches] == [8, 16, 24]
    (idx, tokens, _), = rlhf.pack(rows, pad_id=0, bucket=1)  # one batch, exact width
    assert tokens.shape == (5, 17) and sorted(idx.tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="no tokens"):
        rlhf.pack([[1], []], pad_id=0)


def test_running_moments_match_numpy_over_every_value_seen():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(3, 2, n) for n in (5, 1, 17, 8)]
    m = rlhf.RunningMoments()
    for c in chunks:
        m.update(c)
    allv = np.concatenate(chunks)
    assert m.count == len(allv)
    assert m.mean == pytest.approx(allv.mean(), rel=1e-12)
    assert m.std == pytest.approx(allv.std(), rel=1e-12)
    restored = rlhf.RunningMoments(**m.state())
    assert (restored.mean, restored.std) == (m.mean, m.std)


def test_normalisation_modes():
    s = np.array([1.0, 2.0, 4.0, 9.0], np.float32)
    np.testing.assert_array_equal(rlhf.normalize(s, "none"), s)
    np.testing.assert_allclose(rlhf.normalize(s, "batch"), (s - 4.0) / (s.std() + 1e-6),
                               rtol=1e-6)
    m = rlhf.RunningMoments()
    m.update([0.0, 10.0])  # seen before: mean 5, then with s: mean 26/6
    out = rlhf.normalize(s, "running", m)
    allv = np.array([0.0, 10.0, 1, 2, 4, 9])
    np.testing.assert_allclose(out, (s - allv.mean()) / (allv.std() + 1e-6), rtol=1e-5)
    with pytest.raises(ValueError, match="normalize='zscore'.*running"):
        rlhf.normalize(s, "zscore")


def test_sequence_kl_sums_log_mu_minus_log_ref_over_the_response():
    mu = np.array([[-1.0, -2.0, -0.5], [-0.1, -0.2, 9.9]])
    ref = np.array([[-1.5, -1.0, -0.5], [-0.3, -0.2, -9.9]])
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    np.testing.assert_allclose(rlhf.sequence_kl(mu, ref, mask), [0.5 - 1.0 + 0.0, 0.2],
                               rtol=1e-6)


def test_correlation_and_its_constant_case():
    assert rlhf.correlation([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert rlhf.correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(rlhf.correlation([1, 1, 1], [1, 2, 3]))


def test_a_multi_turn_prompt_is_rendered_as_its_conversation(tokenizers):
    _, rm = tokenizers
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "zaku?"}]
    text = rlhf.render(rm, conv, "tebi")
    assert text == ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
                    "<|im_start|>user\nzaku?<|im_end|>\n<|im_start|>assistant\ntebi<|im_end|>\n")
    assert rlhf.render(rm, conv, "tebi", "plain") == "hi\n\nhello\n\nzaku?\n\ntebi"
    assert rlhf.last_user_text(conv) == "zaku?" and rlhf.last_user_text("p") == "p"
    assert conv[-1]["content"] == "zaku?"  # the caller's list is not changed
