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
    state = {k: v for k, v in ref.state_dict().items() if k != 'threshold'}
    state['activation.threshold'] = torch.tensor([0.25])
    with open(tmp_path/'sae.pt', 'wb') as fd:
        act = {'cls': 'BatchTopK', 'params': {'top_k': 2}}
        fd.write((json.dumps({'schema': 5, 'cfg': {'d_model': 8, 'd_sae': 16, 'activation': act}}) + '\n').encode())
        torch.save(state, fd)
    sae = load_sae(tmp_path/'sae.pt')
    assert float(sae.threshold) == 0.25 and isinstance(sae.cfg.activation, BatchTopK)

@pytest.mark.parametrize('objective,prefixes', [(Vanilla(), None), (Matryoshka(n_prefixes=3), [4, 16, 32])])
@pytest.mark.parametrize('pre_subtract', [False, True])
def test_fused_relu_l1_gradients_bit_identical(objective, prefixes, pre_subtract):
    "`relu_l1` (the default) against plain autograd (`fused=False`): loss, statistics and every gradient, bit for bit."
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) - 0.3
    out = []
    for fused in (True, False):
        sae = SAE(SAEConfig(d_model=8, d_sae=32, pre_subtract_b_dec=pre_subtract), seed=3)
        with torch.no_grad(): sae.b_enc.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))  # some codes 0
        loss, st = sae_loss(sae, x, objective, 1e-2, prefixes=prefixes, fused=fused)
        loss.backward()
        out.append((st, {k: p.grad for k, p in sae.named_parameters()}))
    (st_f, g_f), (st_p, g_p) = out
    assert 0 < float(st_f['l0']) < 32
    for k in ('loss', 'mse', 'mse_prefix', 'l1', 'l0', 'sparsity', 'f_x', 'x_hat', 'fired_s'):
        assert torch.equal(st_f[k], st_p[k]), k
    for k in g_p: assert torch.equal(g_f[k], g_p[k]), k

def test_fused_relu_l1_bf16_autocast_within_rounding():
    "Under bf16 autocast the fused backward adds the L1 constant before rounding: gradients agree to bf16 rounding."
    x = torch.randn(128, 16, generator=torch.Generator().manual_seed(0))
    grads = []
    for fused in (True, False):
        sae = SAE(SAEConfig(d_model=16, d_sae=64), seed=0)
        with torch.autocast('cpu', dtype=torch.bfloat16): loss, _ = sae_loss(sae, x, Vanilla(), 1e-2, fused=fused)
        loss.backward(); grads.append({k: p.grad.float() for k, p in sae.named_parameters()})
    for k in grads[0]:
        scale = grads[1][k].abs().max()
        assert (grads[0][k] - grads[1][k]).abs().max() <= 2 ** -7 * scale, k

def test_fused_flag_leaves_other_activations_alone():
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    for act in (TopK(top_k=3), BatchTopK(top_k=3)):
        res = []
        for fused in (True, False):
            sae = SAE(SAEConfig(d_model=8, d_sae=32, activation=act), seed=5)
            loss, st = sae_loss(sae, x, Matryoshka(n_prefixes=3), prefixes=[4, 16, 32], fused=fused)
            loss.backward(); res.append((loss.detach(), sae.W_enc.grad, st['l1']))
        assert all(torch.equal(a, b) for a, b in zip(*res))

def _saev_encode(fpath, x, top_k=None):
    """saev's `encode` on a saev checkpoint, written out here (not importing saev): `x @ W_enc + b_enc`, then its ReLU,
    or its TopK (the k largest pre-activations kept, negative ones too)."""
    import io
    st = torch.load(io.BytesIO(fpath.read_bytes().split(b'\n', 1)[1]), weights_only=True)
    h_x = x @ st['W_enc'] + st['b_enc']
    if top_k is None: return torch.relu(h_x)
    return torch.zeros_like(h_x).scatter(-1, torch.topk(h_x, top_k, dim=-1, sorted=False).indices, 1.0) * h_x

@pytest.mark.parametrize('act', [Relu(), TopK(top_k=16)], ids=['relu', 'topk'])
def test_saev_export_folds_pre_subtracted_b_dec(tmp_path, act):
    "saev has no b_dec pre-subtraction: the export folds it into b_enc, so saev's formula gives our codes (~1e-5)."
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_model=64, d_sae=256, activation=act, pre_subtract_b_dec=True), seed=3)
    with torch.no_grad(): sae.b_dec.normal_(0, 2.0); sae.b_enc.normal_(0.3, 0.1)  # b_dec matters: ~2 per dimension
    x = torch.randn(512, 64) * 3 + sae.b_dec.detach()
    with torch.no_grad(): f_here = sae(x).f_x
    assert topk_saev_difference(sae, x) is None  # every token has >= k positive pre-activations: TopKs agree
    fpath = save_saev_checkpoint(sae, tmp_path/'sae.pt')
    f_saev = _saev_encode(fpath, x, getattr(act, 'top_k', None))
    assert (f_saev - f_here).abs().max() < 5e-5 and torch.equal(f_saev > 0, f_here > 0)  # measured: 7.6e-6
    raw = torch.load(__import__('io').BytesIO(fpath.read_bytes().split(b'\n', 1)[1]), weights_only=True)
    assert not torch.allclose(raw['b_enc'], sae.b_enc.detach())  # the fold changed it
    back = load_sae(fpath)  # and back: saev's format has no pre-subtraction, the folded bias gives the same codes
    assert not back.cfg.pre_subtract_b_dec
    with torch.no_grad(): assert torch.allclose(back(x).f_x, f_here, atol=1e-5 * float(f_here.abs().max()))
    with torch.no_grad(): assert torch.allclose(back(x).x_hat, sae(x).x_hat, atol=1e-4)

def test_saev_export_without_pre_subtraction_is_exact(tmp_path):
    sae = SAE(SAEConfig(d_model=16, d_sae=64), seed=1)
    with torch.no_grad(): sae.b_dec.normal_(); sae.b_enc.normal_()
    fpath = save_saev_checkpoint(sae, tmp_path/'sae.pt')
    x = torch.randn(32, 16)
    with torch.no_grad(): assert torch.equal(load_sae(fpath)(x).f_x, sae(x).f_x)

def test_topk_difference_warns_on_export_and_load(tmp_path):
    "k above a quarter of the width: both the exporter and the loader warn once, saying what differs."
    sae = SAE(SAEConfig(d_model=16, d_sae=64, activation=TopK(top_k=40)), seed=0)
    with pytest.warns(UserWarning, match=r'top_k=40 is above 0.25 of d_sae=64: saev\'s TopK keeps the 40 largest'):
        fpath = save_saev_checkpoint(sae, tmp_path/'big.pt')
    with pytest.warns(UserWarning, match=r'big.pt: top_k=40 .* fewer than 40 positive pre-activations'):
        load_sae(fpath)
    x = torch.randn(64, 16)  # measured: the count of tokens that differ, here most of them
    with pytest.warns(UserWarning, match=r'of 64 tokens measured have fewer than 40 positive'):
        save_saev_checkpoint(sae, tmp_path/'big2.pt', x_bd=x)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # small k: silent
        load_sae(save_saev_checkpoint(SAE(SAEConfig(d_model=16, d_sae=64, activation=TopK(top_k=16))), tmp_path/'k.pt'))
        load_sae(save_saev_checkpoint(SAE(SAEConfig(d_model=16, d_sae=64, activation=BatchTopK(top_k=40))),
                                      tmp_path/'b.pt'))

# --- variants mapped once: each class carries its behaviour; nothing dispatches on isinstance -----------------------

def test_variant_class_attributes():
    "The trainer's two questions are class attributes: `batch_threshold` (BatchTopK only) and `nested` (Matryoshka)."
    assert {k: c.batch_threshold for k, c in ACTIVATIONS.items()} == {'relu': False, 'topk': False, 'batchtopk': True}
    assert {k: c.nested for k, c in OBJECTIVES.items()} == {'vanilla': False, 'matryoshka': True}
    assert all(c.kind == k for k, c in {**ACTIVATIONS, **OBJECTIVES}.items())
    assert {c.saev_name: c for c in ACTIVATIONS.values()} == SAEV_ACTIVATIONS
    assert BatchTopK(top_k=3).batch_threshold and Matryoshka(n_prefixes=2).nested  # on instances too

def test_every_variant_answers_the_interface():
    for c in ACTIVATIONS.values():
        for m in ('codes', 'init_buffers', 'loss_codes', 'sparsity_term', 'aux_term', 'from_saev', 'saev_payload',
                  'saev_buffers', 'saev_state'):
            assert callable(getattr(c(), m)), (c, m)
    for c in OBJECTIVES.values(): assert callable(c().uses_prefixes) and callable(c().mse_loss)

def test_no_isinstance_dispatch_on_variants():
    "sae.py asks the classes; `isinstance` remains only for checking what a file held."
    import re, saev_nb.sae as mod
    from pathlib import Path
    src = Path(mod.__file__).read_text()
    assert not re.findall(r'isinstance\([^)]*\b(Relu|TopK|BatchTopK|KSparse|Vanilla|Matryoshka)\b', src)
    assert not re.findall(r'type\(\w+\) (is|==) (Relu|TopK|BatchTopK|Vanilla|Matryoshka)\b', src)

def test_flags_and_saved_configs_unchanged():
    "The subcommand names, fields and JSON form of every variant are those of the files already on disk."
    import tyro
    cfg = tyro.cli(SAEConfig, args=['--exp-factor', '4', 'activation:batchtopk', '--activation.top-k', '3',
                                    '--activation.momentum', '0.2', '--activation.aux-k', '7',
                                    '--activation.aux-alpha', '0'])
    assert cfg == SAEConfig(exp_factor=4, activation=BatchTopK(top_k=3, momentum=0.2, aux_k=7, aux_alpha=0.0))
    assert tyro.cli(Objective, args=['matryoshka', '--sparsity-coeff', '1e-3', '--n-prefixes', '3']) == \
        Matryoshka(sparsity_coeff=1e-3, n_prefixes=3)
    assert json.dumps(sae_cfg_to_dict(SAEConfig(d_model=8, activation=TopK(top_k=2)))) == (
        '{"d_model": 8, "d_sae": null, "exp_factor": 16, "activation": {"kind": "topk", "top_k": 2, "aux_k": 512, '
        '"aux_alpha": 0.03125}, "pre_subtract_b_dec": false, "normalize_w_dec": true, "remove_parallel_grads": true}')
    assert sae_cfg_to_dict(SAEConfig(activation=BatchTopK()))['activation'] == {
        'kind': 'batchtopk', 'top_k': 32, 'momentum': 0.1, 'aux_k': 512, 'aux_alpha': 0.03125}
    assert sae_cfg_to_dict(SAEConfig())['activation'] == {'kind': 'relu'}

def _reference_loss(sae, x_bd, objective, coeff, dead_s, prefixes, fused):
    "`sae_loss` as written before the variants became classes (isinstance dispatch), the byte-identity reference."
    act = sae.cfg.activation
    matryoshka = type(objective).__name__ == 'Matryoshka' and prefixes is not None and len(prefixes) > 1
    relu, x_hat = type(act).__name__ == 'Relu', None
    if fused and relu:
        h_bs = sae.pre_acts(x_bd)
        if matryoshka: f_bs, l1 = relu_l1(h_bs)
        else: f_bs, l1, x_hat = relu_l1(h_bs, sae.W_dec, sae.b_dec)
    else: (h_bs, f_bs), l1 = sae.encode(x_bd), None
    if matryoshka:
        x_hats = sae.decode_prefixes(f_bs, prefixes); x_hat = x_hats[:, -1]
        mse_loss = ((x_hats - x_bd[:, None]) ** 2).mean()
    else:
        if x_hat is None: x_hat = sae.decode(f_bs)
        mse_loss = ((x_hat - x_bd) ** 2).mean()
    if l1 is None: l1 = f_bs.sum(-1).mean()
    sparsity = coeff * l1 if relu else l1.new_zeros(())
    aux = l1.new_zeros(())
    if not relu and act.aux_alpha > 0 and dead_s is not None and sae.training:
        aux = act.aux_alpha * auxk_loss(sae, x_bd, h_bs, x_hat, dead_s, act.aux_k)
    return mse_loss + sparsity + aux

@pytest.mark.parametrize('act', [Relu(), TopK(top_k=4, aux_k=8), BatchTopK(top_k=4, aux_k=8)], ids=str)
@pytest.mark.parametrize('objective', [Vanilla(), Matryoshka(n_prefixes=4)], ids=str)
@pytest.mark.parametrize('fused', [True, False])
def test_training_bit_identical_to_isinstance_dispatch(act, objective, fused):
    "Ten Adam steps through `sae_loss` and through the pre-redesign loss give the same weights, bit for bit."
    data = torch.randn(640, 16, generator=torch.Generator().manual_seed(0)) + 0.5
    dead = torch.zeros(64, dtype=torch.bool); dead[::3] = True
    weights = []
    for loss_fn in (lambda *a: sae_loss(*a, fused=fused)[0], lambda *a: _reference_loss(*a, fused)):
        sae = SAE(SAEConfig(d_model=16, d_sae=64, activation=act, pre_subtract_b_dec=True), seed=1)
        sae.init_b_dec(data[:256]); sae.init_from_data(data[:256], seed=2)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        for b in range(10):
            pre = sample_prefixes(64, 4, torch.Generator().manual_seed(b)) if objective.nested else None
            opt.zero_grad(); loss_fn(sae, data[b * 64:(b + 1) * 64], objective, 1e-2, dead, pre).backward()
            sae.remove_parallel_grads(); opt.step(); sae.normalize_w_dec()
        weights.append({k: v.detach().clone() for k, v in sae.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]: assert torch.equal(weights[0][k], weights[1][k]), k

def test_checkpoint_file_uses_the_one_file_check(tmp_path):
    "Missing, folder, device and oversized files: `core.checked_file`'s one line; empty: ours (retrain)."
    from saev_nb.core import UserError, MissingFileError
    with pytest.raises(MissingFileError, match='not found; no SAE checkpoint here'): checkpoint_file(tmp_path/'x.pt')
    with pytest.raises(UserError, match='a folder, expected an SAE checkpoint'): checkpoint_file(tmp_path)
    with pytest.raises(UserError, match='/dev/zero: not a regular file, expected an SAE checkpoint'):
        load_sae('/dev/zero')
    fpath = save_sae(SAE(SAEConfig(d_model=4, d_sae=8)), tmp_path/'sae.safetensors')
    with pytest.raises(UserError, match=r'bytes, more than an SAE checkpoint can be \(100\)'):
        checkpoint_file(fpath, 100)
    (tmp_path/'e.pt').write_bytes(b'')
    with pytest.raises(CheckpointError, match='empty file, not an SAE checkpoint'): checkpoint_file(tmp_path/'e.pt')
    assert checkpoint_file(fpath) == fpath
