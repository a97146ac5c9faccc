"""TopK's sparse training path against the dense reference: the same loss and the same gradients, on the CPU and
(marked ``cuda``) on a GPU, where cuSPARSE requires a CSR matrix's columns sorted within each row."""

import pytest
import torch
from conftest import needs_cuda

from sae.dictionaries import build
from sae.dictionaries import topk as topk_module
from sae.dictionaries.topk import densify, sparse_decode, sparse_topk

_CSR = torch.sparse_csr_tensor


def _strict_csr(*args, **kwargs):
    """``torch.sparse_csr_tensor`` that checks the invariants cuSPARSE relies on (sorted, distinct columns)."""
    return _CSR(*args, **{**kwargs, "check_invariants": True})


def _dense_reference(pre, x, weight, bias, atoms, k):
    """The same function with dense codes, through ordinary autograd."""
    pre = x @ weight.T + bias
    values, indices = torch.relu(pre).topk(k, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, indices, values)
    return codes @ atoms


def _compare(device: str, monkeypatch=None) -> None:
    torch.manual_seed(0)
    batch, d, n, k = 64, 16, 48, 6
    x = torch.randn(batch, d, device=device, requires_grad=True)
    weight = torch.randn(n, d, device=device, requires_grad=True)
    bias = torch.randn(n, device=device, requires_grad=True)
    atoms = torch.randn(n, d, device=device, requires_grad=True)
    upstream = torch.randn(batch, d, device=device)

    with torch.no_grad():
        pre = x @ weight.T + bias
    values, indices = sparse_topk(pre, x, weight, bias, k)
    order = torch.rand(indices.shape, device=device).argsort(dim=-1)  # columns in no particular order
    values, indices = values.gather(-1, order), indices.gather(-1, order)
    assert not (indices.diff(dim=-1) > 0).all()
    out = sparse_decode(indices, values, atoms)
    sparse_grads = torch.autograd.grad((out * upstream).sum(), (x, weight, bias, atoms))

    dense = _dense_reference(pre, x, weight, bias, atoms, k)
    dense_grads = torch.autograd.grad((dense * upstream).sum(), (x, weight, bias, atoms))
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("x", "W_enc", "b_enc", "atoms"), sparse_grads, dense_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


def test_sparse_backward_matches_dense_with_unsorted_columns(monkeypatch):
    # every CSR the backward builds must be valid as cuSPARSE reads it (the check fails on unsorted columns)
    monkeypatch.setattr(topk_module.torch, "sparse_csr_tensor", _strict_csr, raising=True)
    _compare("cpu")


@needs_cuda
def test_sparse_backward_matches_dense_on_cuda():
    _compare("cuda")


@needs_cuda
def test_topk_train_terms_on_cuda_match_cpu():
    """The whole TopK training step (AuxK included) gives the CPU's loss and gradients on a GPU."""
    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        d = build("topk", 16, 64, k=4, aux_coeff=1 / 32, k_aux=None).to(device)
        x = torch.randn(128, 16, device=device)
        dead = torch.arange(64, device=device) < 20
        terms = d.train_terms(x, dead=dead)
        loss = (terms["x_hat"] - x).pow(2).sum(-1).mean() + terms["aux"]
        loss.backward()
        results.append((loss.item(), {n: p.grad.cpu() for n, p in d.named_parameters()}))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-4)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_unit_rows_gradient_equals_autograd_of_the_formula():
    """``unit_rows``' own backward gives autograd's gradient of ``w / max(|w|, 1e-8)``, a clamped row included."""
    from sae.dictionaries.base import unit_rows

    torch.manual_seed(0)
    w = torch.randn(40, 12, dtype=torch.float64)
    w[3] *= 1e-10  # below the clamp
    upstream = torch.randn(40, 12, dtype=torch.float64)
    mine, plain = w.clone().requires_grad_(), w.clone().requires_grad_()
    out = unit_rows(mine)
    (out * upstream).sum().backward()
    ref = plain / plain.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mine.grad, plain.grad, rtol=1e-10, atol=1e-10)


def test_sparse_topk_keeps_nothing_negative_when_fewer_than_k_are_positive():
    """With fewer than ``k`` positive pre-activations the extra kept entries are 0, as in ReLU-then-TopK."""
    pre = torch.tensor([[3.0, -1.0, -2.0, 0.5], [-1.0, -2.0, -3.0, -4.0]])
    x, weight, bias = torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(4)
    values, indices = sparse_topk(pre, x, weight, bias, 3)
    ref_values, ref_indices = torch.relu(pre).topk(3)
    assert (values >= 0).all()
    torch.testing.assert_close(densify(indices, values, 4), densify(ref_indices, ref_values, 4))


def test_topk_sparse_codes_count_firing_as_dense_codes():
    """The CSR codes of a training step, zero-valued kept entries included (rows with fewer than ``k`` positive
    pre-activations), give the dense codes' firing counts and L0; the step after a wider one (the reused buffer
    for the pre-activations) gives what a fresh dictionary does."""
    from sae.dictionaries.base import firing

    torch.manual_seed(0)
    d = build("topk", 8, 32, k=5, aux_coeff=0.0, k_aux=None)
    with torch.no_grad():
        d.b_enc.fill_(-0.4)
    x = torch.randn(64, 8)
    build("topk", 8, 300, k=5, aux_coeff=0.0, k_aux=None).train_terms(torch.randn(100, 8))  # a larger buffer
    codes = d.train_terms(x)["codes"]
    assert (codes.values() == 0).any() and (codes.values() > 0).any()
    dense = d.encode_normalised(x)
    fired, l0 = firing(codes)
    want_fired, want_l0 = firing(dense)
    assert fired.dtype == want_fired.dtype
    torch.testing.assert_close(fired, want_fired)
    torch.testing.assert_close(l0, want_l0)
    torch.testing.assert_close(codes.to_dense(), dense)



@pytest.mark.parametrize("variant", ["topk", "batchtopk"])
def test_topk_step_runs_under_autocast(variant):
    """Under bf16 autocast (``train.precision=bf16-mixed``) a training step runs: the encoder's product goes into
    the reused fp32 buffer (autocast does not cover calls with ``out=``), so the sparse decoder's weights and codes
    share a dtype (a bf16 product made ``embedding_bag`` refuse fp32 atoms with bf16 codes)."""
    from sae.training.objectives import reconstruction_loss

    hparams = {"k": 3, "aux_coeff": 0.1, "k_aux": None, **({"threshold_lr": 0.1} if variant == "batchtopk" else {})}
    d = build(variant, 8, 32, **hparams)
    dead = torch.arange(32) < 8
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms = reconstruction_loss(d, torch.randn(16, 8), dead)
    loss.backward()
    assert terms["codes"].values().dtype == torch.float32 and d.W_enc.grad is not None and d.W_dec.grad is not None


def _relu_step(dictionary, x, train_terms):
    """A ReLU/L1 step's loss, gradients and firing counts through ``train_terms``; between its forward and backward
    passes, another dictionary's step overwrites the CPU's shared pre-activations buffer."""
    from sae.dictionaries.base import firing
    from sae.dictionaries.sparse import scratch

    dictionary.zero_grad()
    terms = train_terms(x)
    scratch(len(x), dictionary.n_features, x).fill_(7.0)
    loss = (terms["x_hat"] - x).pow(2).sum(-1).mean() + terms["sparsity"]
    loss.backward()
    return terms, loss.detach(), {n: p.grad.clone() for n, p in dictionary.named_parameters()}, firing(terms["codes"])


@pytest.mark.parametrize("variant", ["relu", "relu_tied"])
@pytest.mark.parametrize("b_enc, layout", [(0.0, torch.strided), (-2.5, torch.sparse_csr)])
def test_relu_step_equals_autograd_whether_its_codes_are_dense_or_sparse(monkeypatch, variant, b_enc, layout):
    """Half-dense codes (an untrained dictionary) take the dense step, codes under 1/32 dense (a trained one) the
    sparse step; either gives autograd's loss, gradients and firing counts, every CSR valid as cuSPARSE reads it."""
    from sae.dictionaries.base import Dictionary

    monkeypatch.setattr(torch, "sparse_csr_tensor", _strict_csr, raising=True)
    torch.manual_seed(0)
    dictionary = build(variant, 16, 256, l1_coeff=0.1)
    with torch.no_grad():
        dictionary.b_enc.fill_(b_enc)
        dictionary.b_dec.normal_(0, 0.1)
    x = torch.randn(64, 16)
    terms, loss, grads, fired = _relu_step(dictionary, x, dictionary.train_terms)
    assert terms["codes"].layout == layout
    want_terms, want_loss, want_grads, want_fired = _relu_step(dictionary, x, lambda x: Dictionary.train_terms(
        dictionary, x))
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fired[0], want_fired[0])
    torch.testing.assert_close(fired[1], want_fired[1])
    assert grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # a dense step after a sparse one (which leaves the shared buffer in use): its saved codes must be its own
    with torch.no_grad():
        dictionary.b_enc.fill_(0.0)
    terms, loss, grads, _ = _relu_step(dictionary, x, dictionary.train_terms)
    _, want_loss, want_grads, _ = _relu_step(dictionary, x, lambda x: Dictionary.train_terms(dictionary, x))
    assert terms["codes"].layout == torch.strided
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
