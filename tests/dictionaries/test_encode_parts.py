"""``encode_parts``: the codes of a batch in parts of bounded size, equal to encoding it whole."""

import torch

from sae.dictionaries import build, encode_parts


def test_parts_equal_the_whole_and_stay_within_the_bound():
    torch.manual_seed(0)
    d = build("topk", 8, 64, k=4, aux_coeff=0.0, k_aux=None)
    x = torch.randn(10, 3, 8)
    max_bytes = 4 * 64 * 3 * 2  # two contexts' codes
    parts = list(encode_parts(d, x, max_bytes))
    assert [first for first, _ in parts] == [0, 2, 4, 6, 8]
    assert all(codes.numel() * 4 <= max_bytes for _, codes in parts)
    torch.testing.assert_close(torch.cat([codes for _, codes in parts]), d.encode(x))


def test_one_row_at_least_when_a_row_exceeds_the_bound():
    d = build("topk", 8, 64, k=4, aux_coeff=0.0, k_aux=None)
    parts = list(encode_parts(d, torch.randn(3, 8), max_bytes=1))
    assert [len(codes) for _, codes in parts] == [1, 1, 1]
