"Integration and failure tests for saev_nb.sae: activations, invariants, objectives, checkpoints."
import json, torch, pytest
from saev_nb.sae import *

def test_topk_never_negative_and_grad_sparse():
    h = (torch.randn(16, 64) - 2).requires_grad_()
    f = topk_act(h, 8)
    assert (f >= 0).all() and ((f > 0).sum(-1) <= 8).all()
    f.sum().backward()
    assert ((h.grad != 0) == (f > 0)).all()

def test_batch_topk_all_negative_keeps_threshold():
    sae = SAE(SAEConfig(d_model=4, d_sae=8, activation=BatchTopK(top_k=2)))
    sae(torch.randn(32, 4)); thr = float(sae.threshold)
    with torch.no_grad(): sae.b_enc.fill_(-1e6)
    out = sae(torch.randn(32, 4))
    assert (out.f_x == 0).all() and float(sae.threshold) == thr

def test_parallel_grad_removal_non_unit_rows():
    sae = SAE(SAEConfig(d_model=16, d_sae=32))
    with torch.no_grad(): sae.W_dec.mul_(torch.rand(32, 1) * 3 + 0.1)
    sae.W_dec.grad = torch.randn(32, 16)
    sae.remove_parallel_grads()
    cos = (sae.W_dec.grad * sae.W_dec).sum(1) / (sae.W_dec.grad.norm(dim=1) * sae.W_dec.norm(dim=1))
    assert cos.abs().max() < 1e-5
    sae.normalize_w_dec(); assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-6)

def test_matryoshka_prefix_loss_matches_manual():
    sae = SAE(SAEConfig(d_model=8, d_sae=32), seed=1); x = torch.randn(10, 8)
    _, st = sae_loss(sae, x, Matryoshka(n_prefixes=3), prefixes=[4, 16, 32])
    f = sae(x).f_x
    manual = torch.stack([((f[:, :c] @ sae.W_dec[:c] + sae.b_dec - x) ** 2).mean() for c in (4, 16, 32)]).mean()
    assert torch.allclose(st['mse_prefix'], manual, atol=1e-6)

def test_auxk_only_dead_rows_get_grad():
    sae = SAE(SAEConfig(d_model=8, d_sae=32, activation=TopK(top_k=2, aux_k=4)))
    dead = torch.zeros(32, dtype=torch.bool); dead[:5] = True
    loss, st = sae_loss(sae, torch.randn(64, 8), dead_s=dead)
    h, _ = sae.encode(x := torch.randn(64, 8)); x_hat = sae(x).x_hat.detach()
    aux_grad = torch.autograd.grad(auxk_loss(sae, x, h, x_hat, dead, 4), sae.W_dec)[0]
    assert aux_grad is not None and (aux_grad[5:] == 0).all()

@pytest.mark.parametrize('act', [Relu(), TopK(top_k=3), BatchTopK(top_k=3)])
def test_safetensors_roundtrip(tmp_path, act):
    sae = SAE(SAEConfig(d_model=8, exp_factor=2, activation=act, pre_subtract_b_dec=True), seed=2)
    sae(torch.randn(16, 8)); sae.eval()
    sae2 = load_sae(save_sae(sae, tmp_path/'sae.safetensors')).eval()
    x = torch.randn(5, 8)
    assert sae2.cfg == sae.cfg and torch.equal(sae2(x).x_hat, sae(x).x_hat)

def test_bad_checkpoints(tmp_path):
    (tmp_path/'junk.pt').write_bytes(b'\x80notjson\n')
    with pytest.raises(ValueError, match='JSON header'): load_sae(tmp_path/'junk.pt')
    (tmp_path/'nocfg.pt').write_text(json.dumps({'schema': 5, 'cfg': {'foo': 1}}) + '\n')
    with pytest.raises(ValueError, match='d_model'): load_sae(tmp_path/'nocfg.pt')
    with pytest.raises(FileNotFoundError): load_sae(tmp_path/'missing.safetensors')

def test_saev_batchtopk_checkpoint(tmp_path):
    ref = SAE(SAEConfig(d_model=8, d_sae=16, activation=BatchTopK(top_k=2)), seed=4)
    state = {k: v for k, v in ref.state_dict().items() if k != 'threshold'}; state['activation.threshold'] = torch.tensor([0.25])
    with open(tmp_path/'sae.pt', 'wb') as fd:
        fd.write((json.dumps({'schema': 5, 'cfg': {'d_model': 8, 'd_sae': 16, 'activation': {'cls': 'BatchTopK', 'params': {'top_k': 2}}}}) + '\n').encode())
        torch.save(state, fd)
    sae = load_sae(tmp_path/'sae.pt')
    assert float(sae.threshold) == 0.25 and isinstance(sae.cfg.activation, BatchTopK)
