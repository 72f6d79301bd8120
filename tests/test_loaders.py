"""saev_nb.loaders: every token exactly once per epoch (each token set), values against the stored bytes, seeding and resume without re-reading, label filtering, dtypes, normalization, ordered/indexed access, worker
errors raised in the consumer (never a hang), one clear line per bad input."""
import dataclasses, json, os, shutil, subprocess, sys, threading, time
from pathlib import Path

import numpy as np
import pytest
import torch

from saev_nb.core import MissingFileError, UserError
from saev_nb.loaders import (ExampleReader, IndexedDataset, LoaderError, Normalizer, OrderedConfig, OrderedLoader, ShardSource,
                             ShuffledConfig, ShuffledLoader, batch_entropy)
from saev_nb.loader_threads import GatherTicket, RowGather, SlotRing, background
from saev_nb.pagecache import cached_probes
from saev_nb.shards import HASH_FNAME, Metadata, ShardError, load_shard_info, make_random_shards, open_shard, shard_name
from helpers import evict

ROOT = Path(__file__).resolve().parents[1]
P = 12  # content tokens per example in the fixtures


@pytest.fixture(scope='module')
def sd(tmp_path_factory):
    "Three layers, 50 examples of CLS + 12 patches, d=16, 4 shards of 14 (last one partial), labels."
    return make_random_shards(tmp_path_factory.mktemp('sh'), n_examples=50, layers=(2, 5, 9), d_model=16, content_tokens=P,
                              max_tokens_per_shard=14 * (P + 1) * 3, seed=3)


def _stored(dpath, layer):
    "(n_examples, tokens_per_example, d) of one layer, read with plain memmaps."
    md = Metadata.load(dpath)
    li = md.layers.index(layer)
    return np.concatenate([np.asarray(open_shard(dpath, i, md))[:md.shard_n(i), li] for i in range(md.n_shards)])


def _key(b, n_t, off):
    return b['example_idx'] * n_t + b['token_idx'] + off


@pytest.mark.parametrize('tokens,n_t,off', [('content', P, 0), ('cls', 1, 1), ('all', P + 1, 1)])
def test_epoch_every_token_once_with_right_values(sd, tokens, n_t, off):
    dl = ShuffledLoader(ShuffledConfig(shards=sd, layer=5, tokens=tokens, batch_size=37, buffer_batches=2, block_examples=3,
                                       block_tokens=5, n_threads=2))
    batches = list(dl)
    keys = torch.cat([_key(b, n_t, off) for b in batches])
    assert sorted(keys.tolist()) == list(range(50 * n_t))
    assert [len(b['acts']) for b in batches] == [37] * (50 * n_t // 37) + ([50 * n_t % 37] if 50 * n_t % 37 else [])
    ref = _stored(sd, 5)
    tok0 = 0 if tokens != 'content' else 1
    for b in batches:
        want = ref[b['example_idx'].numpy(), b['token_idx'].numpy() + 1] if tokens != 'cls' else ref[b['example_idx'].numpy(), 0]
        np.testing.assert_array_equal(b['acts'].numpy(), want)
        if tokens == 'cls': assert (b['token_idx'] == -1).all() and (b['labels'] == -1).all()
    labels = np.fromfile(sd / 'labels.bin', dtype=np.uint8).reshape(50, P).astype(np.int64)
    for b in batches:  # patch labels as stored, -1 exactly on CLS rows (int64, no uint8 wrap-around)
        ex, tok = b['example_idx'].numpy(), b['token_idx'].numpy()
        np.testing.assert_array_equal(b['labels'].numpy(), np.where(tok >= 0, labels[ex, np.maximum(tok, 0)], -1))



def test_windows_of_hundreds_of_batches_and_batches_spanning_windows(sd):
    "More than 255 batch chunks per window (16-bit chunk numbers in the plan), and batches that straddle windows, epochs and shards."
    ref = _stored(sd, 9)
    for bs, bb in [(1, 400), (3, 300), (29, 1)]:
        dl = ShuffledLoader(ShuffledConfig(shards=sd, layer=9, batch_size=bs, buffer_batches=bb, block_examples=2, block_tokens=5, seed=bs))
        n = dl.n_tokens
        batches = list(dl.iter_batches(2 * n + bs // 2))
        keys = torch.cat([_key(b, P, 0) for b in batches])
        assert sorted(keys[:n].tolist()) == sorted(keys[n:2 * n].tolist()) == list(range(50 * P))
        assert [len(b['acts']) for b in batches[:-1]] == [bs] * (len(batches) - 1)
        for b in batches[::7]: np.testing.assert_array_equal(b['acts'].numpy(), ref[b['example_idx'].numpy(), b['token_idx'].numpy() + 1])
        tail = list(ShuffledLoader(dl.cfg).iter_batches(2 * n + bs // 2, start_batch=len(batches) // 2))
        assert all(torch.equal(x[k], y[k]) for x, y in zip(batches[len(batches) // 2:], tail) for k in x) and len(tail) == len(batches) - len(batches) // 2

def test_mixing_spans_shards_and_epochs_differ(sd):
    dl = ShuffledLoader(ShuffledConfig(shards=sd, layer=2, batch_size=100, buffer_batches=2, block_examples=2, block_tokens=4, seed=1))
    e0, e1 = list(dl), list(dl)
    shards_in_batch = [len(set((b['example_idx'] // 14).tolist())) for b in e0]
    assert max(shards_in_batch) >= 3
    assert not torch.equal(e0[0]['example_idx'], e1[0]['example_idx'])
    m = dl.metrics(e0[0])
    assert set(m) == {'loader/example_entropy', 'loader/example_entropy_normalized', 'loader/token_entropy', 'loader/token_entropy_normalized',
                      'loader/example_coverage', 'loader/token_coverage', 'loader/read_mb', 'loader/read_mb_s'}
    assert 0.5 < m['loader/example_entropy_normalized'] <= 1 and 0 < m['loader/example_coverage'] <= 1 and m['loader/read_mb'] > 0


def test_seeded_reproducible_and_seed_matters(sd):
    cfg = ShuffledConfig(shards=sd, layer=9, batch_size=64, buffer_batches=2, block_examples=4, block_tokens=4, seed=5)
    a = [b['acts'] for b in ShuffledLoader(cfg).iter_batches(1000)]
    b = [b['acts'] for b in ShuffledLoader(cfg).iter_batches(1000)]
    c = [b['acts'] for b in ShuffledLoader(dataclasses.replace(cfg, seed=6)).iter_batches(1000)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_resume_equals_suffix_and_skips_reading(sd):
    cfg = ShuffledConfig(shards=sd, layer=9, batch_size=50, buffer_batches=1, block_examples=2, block_tokens=6, seed=2)
    n = 3 * 600 + 70  # 3 epochs and a bit; batches cross epoch boundaries
    full_dl = ShuffledLoader(cfg)
    full = list(full_dl.iter_batches(n))
    assert [len(b['acts']) for b in full] == [50] * 37 + [20]
    keys = torch.cat([_key(b, P, 0) for b in full])
    for e in range(3): assert sorted(keys[e * 600:(e + 1) * 600].tolist()) == list(range(600))
    dl = ShuffledLoader(cfg)
    tail = list(dl.iter_batches(n, start_batch=35))
    assert len(tail) == 3
    for x, y in zip(tail, full[35:]):
        assert torch.equal(x['acts'], y['acts']) and torch.equal(x['example_idx'], y['example_idx'])
    assert dl.read_bytes < full_dl.read_bytes / 5  # only the windows from batch 35 on were read
    assert list(ShuffledLoader(cfg).iter_batches(n, start_batch=40)) == []


def test_ignore_labels_and_drop_last(sd):
    labels = np.fromfile(sd / 'labels.bin', dtype=np.uint8).reshape(50, P)
    dl = ShuffledLoader(ShuffledConfig(shards=sd, layer=2, batch_size=64, ignore_labels=(0, 3), drop_last=True))
    n_keep = int((~np.isin(labels, [0, 3])).sum())
    assert dl.n_tokens == n_keep and len(dl) == n_keep // 64
    batches = list(dl)
    assert len(batches) == n_keep // 64 and all(len(b['acts']) == 64 for b in batches)
    labs = torch.cat([b['labels'] for b in batches])
    assert not torch.isin(labs, torch.tensor([0, 3])).any()
    for b in batches: assert torch.equal(b['labels'], torch.from_numpy(labels[b['example_idx'].numpy(), b['token_idx'].numpy()].astype(np.int64)))


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_half_shards_and_output_dtype(tmp_path, dtype):
    kw = dict(n_examples=20, layers=(0,), d_model=8, content_tokens=6, seed=0, max_tokens_per_shard=7 * 7)
    f32, half = make_random_shards(tmp_path, **kw), make_random_shards(tmp_path, dtype=dtype, **kw)
    ref = IndexedDataset(f32, 0)[torch.arange(120)]['acts']
    for out in ['float32', 'bfloat16']:
        b = next(iter(ShuffledLoader(ShuffledConfig(shards=half, layer=0, batch_size=120, dtype=out))))
        assert b['acts'].dtype == getattr(torch, out)
        k = _key(b, 6, 0)
        torch.testing.assert_close(b['acts'].float(), ref[k], atol=0.1, rtol=0.02)
    o = next(iter(OrderedLoader(OrderedConfig(shards=half, layer=0, batch_size=120, dtype='float32'))))
    torch.testing.assert_close(o['acts'], ref, atol=0.1, rtol=0.02)
    torch.testing.assert_close(IndexedDataset(half, 0)[torch.arange(120)]['acts'].float(), ref, atol=0.1, rtol=0.02)


def test_normalizer_fit_save_load_and_loader(sd, tmp_path):
    sd2 = Path(shutil.copytree(sd, tmp_path / sd.name))
    nz = Normalizer.fit(sd2, 5, n_tokens=10_000)
    x = IndexedDataset(sd2, 5)[torch.arange(600)]['acts']
    torch.testing.assert_close(nz(x).norm(dim=1).mean(), torch.tensor(4.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(nz.inverse(nz(x)), x, atol=1e-4, rtol=1e-4)
    assert not Normalizer.fpath(sd2, 5).exists()
    dl = ShuffledLoader(ShuffledConfig(shards=sd2, layer=5, batch_size=600, normalize=True))
    assert Normalizer.fpath(sd2, 5).exists()  # fitted and saved next to the shards
    b = next(iter(dl))
    torch.testing.assert_close(b['acts'], nz(x[_key(b, P, 0)]), atol=1e-4, rtol=1e-4)
    assert Normalizer.load(sd2, 5).scale == pytest.approx(nz.scale)
    nz.to_file(tmp_path / 'n.safetensors')
    assert Normalizer.from_file(tmp_path / 'n.safetensors').mean_d.shape == (16,)
    with pytest.raises(MissingFileError, match='no normalizer saved'): Normalizer.load(sd2, 9)


def test_ordered_and_indexed(sd):
    odl = OrderedLoader(OrderedConfig(shards=sd, layer=9, tokens='all', batch_size=40))
    assert odl.batch_size == 39 and len(odl) == 17
    batches = list(odl)
    keys = torch.cat([_key(b, P + 1, 1) for b in batches])
    assert keys.tolist() == list(range(50 * 13))
    ref = _stored(sd, 9).reshape(-1, 16)
    np.testing.assert_array_equal(torch.cat([b['acts'] for b in batches]).numpy(), ref)
    ds = IndexedDataset(sd, 9, 'all')
    idx = torch.tensor([0, 13, 649, 300, -1])
    got = ds[idx]
    np.testing.assert_array_equal(got['acts'].numpy(), ref[idx.numpy() % 650])
    assert torch.equal(ds[300]['acts'], got['acts'][3]) and int(ds[0]['token_idx']) == -1
    with pytest.raises(IndexError, match='out of range'): ds[torch.tensor([650])]


def test_saev_named_directory_loads(sd, tmp_path):
    "saev's layout: the directory named by 8 hex characters of the hash, no recorded hash, an extra empty shard after an exact fill."
    ex = make_random_shards(tmp_path / 'x', n_examples=42, layers=(2,), d_model=8, content_tokens=P, max_tokens_per_shard=14 * (P + 1))
    h = Metadata.load(ex).hash
    d = Path(shutil.copytree(ex, tmp_path / 'saev' / 'shards' / h[:8])); (d / HASH_FNAME).unlink()
    shutil.copy(d / shard_name(0), d / shard_name(3))
    (d / 'shards.json').write_text(json.dumps(load_shard_info(d) + [{'name': shard_name(3), 'n_examples': 0}]))
    assert len(list(ShuffledLoader(ShuffledConfig(shards=d, layer=2, batch_size=100)))) == 6  # 42 * 12 tokens
    assert sum(len(b['acts']) for b in OrderedLoader(OrderedConfig(shards=d, layer=2, batch_size=120))) == 42 * P
    renamed = Path(shutil.copytree(sd, tmp_path / 'my-shards'))  # renamed: the recorded hash still matches
    (tmp_path / 'link').symlink_to(d)
    for x in (renamed, tmp_path / 'link'): assert len(IndexedDataset(x, 2)) > 0
    bad = Path(shutil.copytree(d, tmp_path / 'renamed-saev'))
    with pytest.raises(ShardError, match=f'name it \\(or a symlink to it\\) {h[:8]}') as e: ShuffledLoader(ShuffledConfig(shards=bad, layer=2))
    assert 'rewrite' not in str(e.value)


def test_edited_metadata_is_refused(sd, tmp_path):
    "An edited metadata.json (here: other layers) would make the loader read another layer's bytes: refused."
    d = Path(shutil.copytree(sd, tmp_path / sd.name))
    txt = (d / 'metadata.json').read_text()
    (d / 'metadata.json').write_text(txt.replace('"layers": [\n    2,\n    5,\n    9', '"layers": [\n    2,\n    9,\n    5'))
    assert Metadata.load(d).layers == (2, 9, 5)
    for make in (lambda: ShuffledLoader(ShuffledConfig(shards=d, layer=5, batch_size=10)),
                 lambda: OrderedLoader(OrderedConfig(shards=d, layer=5, batch_size=20)), lambda: IndexedDataset(d, 5)):
        with pytest.raises(ShardError, match='metadata.json: edited after recording'): make()
    (d / 'metadata.json').write_bytes(b'{"family": "\xff"}')
    with pytest.raises(ShardError, match=r'metadata.json: not UTF-8 text \(bad byte at 12\)') as e: ShuffledLoader(ShuffledConfig(shards=d, layer=5))
    assert str(d) in str(e.value) and '\n' not in str(e.value)


def test_normalizer_file_follows_umask(sd, tmp_path):
    old = os.umask(0o002)
    try: fpath = Normalizer(torch.zeros(16), 2.0).to_file(tmp_path / 'n.safetensors')
    finally: os.umask(old)
    assert fpath.stat().st_mode & 0o777 == 0o664


# ---- failures: one clear line, raised in the consumer, never a hang ----

def _broken(sd, tmp_path, name='b'):
    return Path(shutil.copytree(sd, tmp_path / name))


@pytest.mark.parametrize('damage,msg', [
    (lambda d: (d / 'acts000002.bin').unlink(), 'acts000002.bin: missing but listed in shards.json'),
    (lambda d: os.truncate(d / 'acts000001.bin', 0), 'acts000001.bin: empty file'),
    (lambda d: os.truncate(d / 'acts000003.bin', 1000), 'acts000003.bin: truncated'),
    (lambda d: (d / 'shards.json').write_text(json.dumps([{'name': shard_name(i), 'n_examples': 14} for i in range(4)])), 'acts000003.bin: shards.json says 14 examples, expected 8'),
    (lambda d: (d / 'shards.json').write_text(json.dumps([{'name': shard_name(i), 'n_examples': 14} for i in range(3)])), 'incomplete, 1 of 4 shards not written'),
    (lambda d: (d / 'labels.bin').write_bytes(bytes([8]) * 600), "labels.bin: label 8 above the class table's 7"),
    (lambda d: (d / 'shards.json').write_text(json.dumps([{'name': 'x.bin', 'n_examples': 50}])), "lists ['x.bin']"),
    (lambda d: (d / 'shards.json').unlink(), 'shards.json: missing'),
    (lambda d: (d / 'metadata.json').unlink(), 'metadata.json: missing'),
    (lambda d: os.truncate(d / 'labels.bin', 10), 'labels.bin: 10 bytes, expected 600'),
])
def test_bad_shard_directories(sd, tmp_path, damage, msg):
    d = _broken(sd, tmp_path)
    damage(d)
    for make in (lambda: ShuffledLoader(ShuffledConfig(shards=d, layer=2, batch_size=10)),
                 lambda: OrderedLoader(OrderedConfig(shards=d, layer=2, batch_size=20)), lambda: IndexedDataset(d, 2)):
        with pytest.raises(ShardError) as e: make()
        assert msg in str(e.value) and '\n' not in str(e.value) and str(d) in str(e.value)


def test_bad_requests(sd, tmp_path):
    with pytest.raises(ShardError, match=r'layer 4 was not recorded \(layers: \[2, 5, 9\]\)'): ShuffledLoader(ShuffledConfig(shards=sd, layer=4))
    with pytest.raises(LoaderError, match='use a batch size in 1..600'): ShuffledLoader(ShuffledConfig(shards=sd, layer=2, batch_size=601))
    with pytest.raises(LoaderError, match='use a batch size in 12..600'): OrderedLoader(OrderedConfig(shards=sd, layer=2, batch_size=601))
    with pytest.raises(LoaderError, match='smaller than one example'): OrderedLoader(OrderedConfig(shards=sd, layer=2, batch_size=5))
    with pytest.raises(ShardError, match="tokens='patch'"): ShuffledLoader(ShuffledConfig(shards=sd, layer=2, tokens='patch'))
    with pytest.raises(LoaderError, match="dtype='int8'"): ShuffledLoader(ShuffledConfig(shards=sd, layer=2, dtype='int8'))
    assert issubclass(LoaderError, UserError) and issubclass(LoaderError, ValueError)
    nolab = make_random_shards(tmp_path, n_examples=6, layers=(0,), d_model=8, content_tokens=4, labels=False)
    with pytest.raises(ShardError, match='labels.bin: missing, but ignore_labels=\\[0\\] needs patch labels'):
        ShuffledLoader(ShuffledConfig(shards=nolab, layer=0, batch_size=4, ignore_labels=(0,)))
    nocls = make_random_shards(tmp_path, n_examples=6, layers=(0,), d_model=8, content_tokens=4, cls_token=False)
    with pytest.raises(ShardError, match="cls_token is false"): ShuffledLoader(ShuffledConfig(shards=nocls, layer=0, tokens='cls', batch_size=4))
    with pytest.raises(ShardError, match='not a directory'): ShuffledLoader(ShuffledConfig(shards=tmp_path / 'nope', layer=0))


def test_file_breaking_mid_run_raises_in_consumer(sd, tmp_path):
    d = _broken(sd, tmp_path)
    dl = ShuffledLoader(ShuffledConfig(shards=d, layer=2, batch_size=20, buffer_batches=1, block_examples=2, block_tokens=12))
    os.truncate(d / 'acts000002.bin', 64)  # after the loader checked the files: the reading threads must notice and report it
    t = time.time()
    with pytest.raises(ShardError, match='shrank to 64 bytes while loading'): list(dl)
    assert time.time() - t < 10


def test_ordered_file_breaking_raises(sd, tmp_path):
    d = _broken(sd, tmp_path)
    odl = OrderedLoader(OrderedConfig(shards=d, layer=2, batch_size=12 * 14))
    os.truncate(d / 'acts000001.bin', 64)
    with pytest.raises(ShardError, match='acts000001.bin: ended at byte'): list(odl)


def test_background_errors_and_dead_workers_never_hang():
    def boom(stop):
        yield 1
        raise KeyError('worker failed')
    t = time.time()
    with pytest.raises(KeyError, match='worker failed'): list(background(boom))
    def dies(stop):
        yield 1
        raise SystemExit  # BaseException also travels to the consumer
    with pytest.raises(SystemExit): list(background(dies))
    assert time.time() - t < 5


def test_early_break_stops_threads(sd):
    before = {t.ident for t in threading.enumerate()}
    dl = ShuffledLoader(ShuffledConfig(shards=sd, layer=2, batch_size=10, buffer_batches=1, block_examples=1, block_tokens=2))
    for i, b in enumerate(dl.iter_batches(10**6)):
        if i == 3: break
    deadline = time.time() + 5
    while time.time() < deadline and any(t.name.startswith('saev') and t.ident not in before for t in threading.enumerate()): time.sleep(0.05)
    assert not [t.name for t in threading.enumerate() if t.name.startswith('saev') and t.ident not in before]


def test_break_mid_epoch_then_iterate_again_is_correct(sd):
    "Copies queued for batches nobody will take are cancelled and finished before the slots are handed out again."
    dl = ShuffledLoader(ShuffledConfig(shards=sd, layer=5, batch_size=40, buffer_batches=3, block_examples=2, block_tokens=3))
    for i, b in enumerate(dl):
        if i == 2: break
    del b
    ref = _stored(sd, 5)
    batches = list(dl)
    assert sum(len(b['acts']) for b in batches) == 50 * P
    for b in batches: np.testing.assert_array_equal(b['acts'].numpy(), ref[b['example_idx'].numpy(), b['token_idx'].numpy() + 1])


def test_row_gather_errors_cancel_and_close():
    src, out = np.arange(40, dtype=np.float32).reshape(10, 4), np.zeros((6, 4), np.float32)
    g = RowGather(n_threads=3, piece_mb=16 / 2**20)  # one row per piece
    tk = g.submit([(src, np.array([9, 0, 3]), out[:3])])
    g.submit([(src, np.array([1, 2]), out[3:5])], tk).wait()
    np.testing.assert_array_equal(out[:5], src[[9, 0, 3, 1, 2]])
    with pytest.raises(ValueError, match='output array does not match'): g([(src, np.array([1, 2, 3]), out[:2, :2])])
    dead = GatherTicket(); dead.cancelled = True
    out[:] = -1
    g.submit([(src, np.array([1, 2]), out[:2])], dead)
    g.close()  # returns only when every queued piece is done or skipped
    assert dead.n_left == 0 and (out == -1).all()
    assert not any(t.is_alive() for t in g._threads)


def test_kept_batches_are_never_overwritten(sd):
    "Output slots are recycled only when the consumer dropped them; keeping every batch must stay correct."
    dl = ShuffledLoader(ShuffledConfig(shards=sd, layer=5, batch_size=20, buffer_batches=2, block_examples=2, block_tokens=3))
    kept = list(dl.iter_batches(1200))
    ref = _stored(sd, 5)
    for b in kept: np.testing.assert_array_equal(b['acts'].numpy(), ref[b['example_idx'].numpy(), b['token_idx'].numpy() + 1])


def test_batch_entropy():
    h, hn, cov = batch_entropy(torch.tensor([0, 0, 1, 1]), 4)
    assert h == pytest.approx(np.log(2)) and hn == pytest.approx(0.5) and cov == 0.5


def _evict(src, sh, lo, hi):
    "Drop `src`'s files from the page cache until none of the pages `prefetch` probes is cached."
    for _ in range(20):  # pages leave once their writeback is done: a busy machine may need a few tries
        evict(src.fpaths)
        if not cached_probes(src.shard_arrays(), sh, lo, hi).any(): return
        time.sleep(0.1)
    pytest.skip('the kernel kept the pages after DONTNEED')


def test_prefetch_exact_spans_and_skips_cached(tmp_path):
    "Advice covers exactly the blocks' bytes (touching pieces merged); no call when cached, calls after eviction."
    d = make_random_shards(tmp_path, n_examples=30, layers=(0, 1), d_model=16, content_tokens=P, max_tokens_per_shard=10 * (P + 1) * 2, seed=1)
    src = ShardSource(d, 1)
    blks = src.blocks(block_examples=4, block_tokens=5)
    sh, lo, hi = src.spans(blks)
    assert int((hi - lo).sum()) == src.n_tokens * src.row_bytes  # every selected byte once, nothing more
    assert len(sh) == src.n_examples  # per example, its token blocks touch and merge into one span
    assert np.all(np.diff(sh) >= 0)
    assert src.prefetch(blks) == 0  # freshly written: cached
    _evict(src, sh, lo, hi)
    assert src.prefetch(blks) == len(sh)


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU-only guard')
def test_cuda_device_without_gpu_is_one_clear_line(sd):
    with pytest.raises(LoaderError, match='device cuda: torch sees no CUDA GPU on this machine; use device cpu'):
        ShuffledLoader(ShuffledConfig(shards=sd, layer=2, batch_size=10, device='cuda'))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_cuda_delivery_pinned_non_blocking(sd):
    dl = ShuffledLoader(ShuffledConfig(shards=sd, layer=5, batch_size=64, device='cuda'))
    ref = _stored(sd, 5)
    for b in dl.iter_batches(2000):
        assert b['acts'].is_cuda
        np.testing.assert_array_equal(b['acts'].cpu().numpy(), ref[b['example_idx'].cpu().numpy(), b['token_idx'].cpu().numpy() + 1])


# ---- output slots: recycled exactly when nothing derived from a batch is alive ----

@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_slot_ring_never_overwrites_what_is_held(dtype):
    "A batch, a slice, a dtype view, a `.numpy()` alias or the storage of it keeps its slot; dropped, the slot is reused."
    ring = SlotRing((6, 4), dtype, n=2)
    bits = lambda t: (t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)).numpy()
    def as_bytes(k):
        if isinstance(k, torch.UntypedStorage): return np.array(k.tolist(), dtype=np.uint8)
        return np.ascontiguousarray(bits(k.contiguous()) if isinstance(k, torch.Tensor) else k).view(np.uint8)
    seven = np.unique(as_bytes(torch.full((2,), 7, dtype=dtype)))
    for hold in (lambda t: t, lambda t: t[2:4], lambda t: t.view(-1), lambda t: t.T, lambda t: bits(t),
                 lambda t: bits(t[1:])[2:], lambda t: t.untyped_storage()):
        t = ring.get()
        assert t.dtype == dtype and t.shape == (6, 4)
        t.fill_(7); ptr, kept = t.data_ptr(), hold(t)
        del t
        for _ in range(5):  # every slot comes round twice or more: none may be the held one
            u = ring.get(); assert u.data_ptr() != ptr; u.fill_(-1); del u
        np.testing.assert_array_equal(np.unique(as_bytes(kept)), seven)
        del kept
    n0, ptrs = ring.n_alloc, set()
    for _ in range(50):  # nothing held: the two slots alternate and nothing new is allocated
        t = ring.get(); ptrs.add(t.data_ptr()); del t
    assert ring.n_alloc == n0 and len(ptrs) == 2


def test_loader_slots_are_reused_and_allocation_stays_bounded(sd):
    "Over many epochs of dropped batches the ring allocates only its slots; a kept batch is never overwritten."
    dl = ShuffledLoader(ShuffledConfig(shards=sd, layer=5, batch_size=20, buffer_batches=2, block_examples=2, block_tokens=3))
    ref = _stored(sd, 5)
    kept = None
    for i, b in enumerate(dl.iter_batches(20 * 400)):
        if i == 7: kept, kept_view, kept_np = b, b['acts'][3:9], b['acts'].numpy()  # held through the rest of the run
    ring = dl._ring
    assert ring.n_alloc <= dl.n_slots + 1  # the slots, plus one to replace the slot the kept batch holds
    for x in (kept['acts'], kept_view, torch.from_numpy(kept_np)):
        assert x.data_ptr() >= kept['acts'].data_ptr()
    np.testing.assert_array_equal(kept['acts'].numpy(), ref[kept['example_idx'].numpy(), kept['token_idx'].numpy() + 1])
    np.testing.assert_array_equal(kept_view.numpy(), kept_np[3:9])


def _rss_anon() -> int:
    "This process's anonymous resident memory in bytes (`RssAnon` of /proc/self/status)."
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('RssAnon:'): return int(line.split()[1]) * 1024
    pytest.skip('no RssAnon in /proc/self/status')


def test_anonymous_memory_stays_bounded(tmp_path):
    "Streaming 200 MB of shards grows private memory by at most the slots plus the index arrays of the windows in flight."
    d_model, tpe = 256, 65
    d = make_random_shards(tmp_path, n_examples=3000, layers=(0,), d_model=d_model, content_tokens=tpe - 1,
                           max_tokens_per_shard=1000 * tpe, seed=0)  # 200 MB in 3 shards of 1000 examples
    cfg = ShuffledConfig(shards=d, layer=0, batch_size=2048, buffer_batches=8, block_examples=8, block_tokens=16)
    dl = ShuffledLoader(cfg)
    data_bytes = dl.n_tokens * d_model * 4
    window_rows = dl.blocks_per_window * dl.block_rows
    slots = dl.n_slots * cfg.batch_size * d_model * 4
    # per window row: address, permutation, chunk id, sort order, metadata (example, token, label); 3 windows in flight
    index = 3 * window_rows * 8 * 8
    bound = slots + index + 16 * 2**20  # + 16 MB for the threads' stacks and the allocator
    assert data_bytes > 4 * bound, (data_bytes, bound)
    base, peak, n = _rss_anon(), 0, 0
    for b in dl:
        n += len(b['acts']); peak = max(peak, _rss_anon())
        del b
    assert n == dl.n_tokens
    assert peak - base <= bound, f'private memory grew by {(peak - base) / 2**20:.0f} MB; bound {bound / 2**20:.0f} MB'


def test_release_drops_consumed_windows_and_keeps_the_stream(tmp_path):
    "With `release` the reader drops each window four windows later; the batches are exactly those without it."
    d = make_random_shards(tmp_path, n_examples=40, layers=(0,), d_model=1024, content_tokens=8, max_tokens_per_shard=20 * 9, seed=0)
    cfg = ShuffledConfig(shards=d, layer=0, batch_size=32, buffer_batches=1, block_examples=4, block_tokens=4, release=True)
    dl = ShuffledLoader(cfg)
    assert dl.release and not ShuffledLoader(dataclasses.replace(cfg, release=None)).release  # 1.3 MB: fits, kept
    released, release = [], dl.src.release
    dl.src.release = lambda blks: released.append(blks) or release(blks)
    got, want = list(dl), list(ShuffledLoader(dataclasses.replace(cfg, release=False)))
    assert len(got) == len(want) == 10
    for x, y in zip(got, want): assert all(torch.equal(x[k], y[k]) for k in x)
    order, _ = dl._windows(0)
    k = dl.blocks_per_window
    assert [b.tolist() for b in released] == [dl.blocks[np.sort(order[w * k:(w + 1) * k])].tolist() for w in range(10 - 4)]
    # the pages themselves: read by a prefetch, released, gone from the page cache. The page cache may hold a span's
    # bytes in folios of up to 2 MB, and DONTNEED keeps a folio that reaches past the range, so the spans are 4 MB and
    # the page checked is a span's middle one: any folio holding it lies inside the span.
    src = ShardSource(make_random_shards(tmp_path / 'fresh', n_examples=4, layers=(0,), d_model=1024,
                                         content_tokens=1024, max_tokens_per_shard=2 * 1025, seed=1), 0)  # never mapped
    blks = src.blocks(block_examples=1, block_tokens=1024)[:2]
    sh, lo, hi = src.spans(blks)
    _evict(src, sh, lo, hi)
    mid = [(int(a) + int(b)) // 2 // 4096 * 4096 for a, b in zip(lo, hi)]
    assert len(sh) == 2 and all(b - a == 4 << 20 for a, b in zip(lo, hi))
    cached = lambda s, off: bool(cached_probes(src.shard_arrays(), np.array([s]), np.array([off]), np.array([off + 1])).all())
    assert src.prefetch(blks) == 2
    for s, a, b in zip(sh.tolist(), lo.tolist(), hi.tolist()):  # wait for those reads: none may land after the release
        os.preadv(src._fd(s), [bytearray(b - a)], a)
    assert all(cached(int(s), m) for s, m in zip(sh, mid))
    src.shard_arrays()[0][mid[0] // src.row_bytes].sum()  # mapped and touched, as the gather leaves it
    assert src.release(blks) == int((hi - lo).sum())  # spans of whole 4 KB rows: every byte is on a page of its own
    assert not any(cached(int(s), m) for s, m in zip(sh, mid))


# ExampleReader: whole examples in storage order, against the stored bytes and labels.bin
@pytest.mark.parametrize('tokens,dtype', [('content', 'float32'), ('all', 'float32'), ('cls', 'float32'), ('all', 'float16')])
def test_example_reader_gives_whole_stored_examples(sd, tokens, dtype):
    "Every example once, in storage order, equal to the stored bytes, with its labels.bin row."
    ref = _stored(sd, 5)[:, {'content': slice(1, None), 'all': slice(None), 'cls': slice(0, 1)}[tokens]]
    n_t = ref.shape[1]
    rd = ExampleReader(sd, 5, tokens, batch_size=n_t * 10 - 1, dtype=dtype)  # 9 examples a batch: crosses shards of 14
    got = list(rd)
    assert rd.examples_per_batch == 9 and len(got) == len(rd) == 6 and [len(b['acts']) for b in got] == [9] * 5 + [5]
    acts = torch.cat([b['acts'] for b in got])
    assert acts.dtype == getattr(torch, dtype) and acts.shape == (50, n_t, 16)
    torch.testing.assert_close(acts.float(), torch.from_numpy(ref), atol=0 if dtype == 'float32' else 1e-2, rtol=1e-3)
    assert torch.equal(torch.cat([b['example_idx'] for b in got]), torch.arange(50))
    labels = np.fromfile(sd/'labels.bin', np.uint8).reshape(50, P)
    assert torch.equal(torch.cat([b['labels'] for b in got]), torch.from_numpy(labels).long())
    assert ExampleReader(sd, 5, tokens, batch_size=10**9).examples_per_batch == 50


def test_example_reader_without_labels(tmp_path):
    d = make_random_shards(tmp_path, n_examples=8, layers=(0,), d_model=8, content_tokens=4, labels=False)
    b = next(iter(ExampleReader(d, 0, batch_size=3 * 4)))
    assert sorted(b) == ['acts', 'example_idx'] and b['acts'].shape == (3, 4, 8)


def test_bare_shard_set_reads_last_layer_and_patches(sd):
    "`ShuffledConfig`/`OrderedConfig` are `ShardSet`s: no layer reads the last recorded one, no token set the patches."
    from saev_nb.shards import ShardSet
    assert issubclass(ShuffledConfig, ShardSet) and issubclass(OrderedConfig, ShardSet)
    assert ShuffledConfig().layer is None and OrderedConfig().tokens is None
    bare = ShuffledLoader(ShuffledConfig(shards=sd, batch_size=37, buffer_batches=2, block_examples=3, block_tokens=4))
    named = ShuffledLoader(ShuffledConfig(shards=sd, layer=9, tokens='content', batch_size=37, buffer_batches=2,
                                          block_examples=3, block_tokens=4))
    assert (bare.src.layer, bare.src.tokens) == (9, 'content')
    for x, y in zip(bare, named, strict=True): assert all(torch.equal(x[k], y[k]) for k in x)
    o_bare, o_named = OrderedLoader(OrderedConfig(shards=sd, batch_size=50)), OrderedLoader(OrderedConfig(shards=sd, layer=9, batch_size=50))
    for x, y in zip(o_bare, o_named, strict=True): assert all(torch.equal(x[k], y[k]) for k in x)
    assert ExampleReader(sd, None, None).src.layer == 9
