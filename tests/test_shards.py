"""saev_nb.shards: stored activations against an independent forward, resumability (crash hook and SIGKILL), n_jobs=2
through submitit's local executor, dtypes, validation, and one clear line for every bad input."""
import base64, dataclasses, fcntl, json, os, pickle, re, resource, shutil, signal, subprocess, sys, threading, time, types
from pathlib import Path

import numpy as np
import pytest
import torch

from saev_nb.data import SegFolderConfig, ImgFolderConfig, make_dataset, tiny_dataset
from saev_nb.models import load_vit, pixel_to_patch_labels
from saev_nb.core import UserError
from saev_nb.jobs import SlurmConfig
from saev_nb.shards import (HASH_FNAME, Metadata, ShardError, as_torch, decode_data, encode_data, load_shard_info,
                            make_random_shards, open_labels, open_shard, shard_name, validate_shards, vit_for_shards)
from saev_nb.writer import WRITER_LOCK, ShardsConfig, write_shards, writer_lock
import saev_nb.writer as writer_mod
from helpers import SAEV_NB, cli, cli_fails as _cli_fails, cli_in_process_fails as _cli_in_process_fails


def cli_fails(*args, contains=''):
    "`helpers.cli_fails` without progress bars (they are allowed on stderr; the error itself is one line)."
    return _cli_fails(*args, contains=contains, env={'TQDM_DISABLE': '1'})

def cli_in_process_fails(*args, contains=''):
    "The same in-process (`helpers.cli_in_process_fails`: the same `main`, no interpreter start-up)."
    return _cli_in_process_fails(*args, contains=contains, env={'TQDM_DISABLE': '1'})

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def seg_root(): return tiny_dataset()


def _cfg(seg_root, tmp_path, **kw):
    base = dict(data=SegFolderConfig(root=seg_root), shards_root=tmp_path / 'shards', layers=(-1, 1), batch_size=16, n_workers=0,
                max_tokens_per_shard=65 * 2 * 24)
    return ShardsConfig(**{**base, **kw})


def _all_acts(dpath):
    md = Metadata.load(dpath)
    return np.concatenate([np.asarray(open_shard(dpath, i, md))[:d['n_examples']] for i, d in enumerate(load_shard_info(dpath))])


def _independent(vit, ds, layers, cls_token):
    "Own forward: embed, then a plain loop over the blocks, keeping CLS (index 0) and the last n_patches tokens."
    x = torch.stack([ds[i]['image'] for i in range(len(ds))])
    with torch.inference_mode():
        h, outs = vit.embed(x), []
        for blk in vit.blocks: h = blk(h); outs.append(h)
    keep = lambda t: torch.cat([t[:, :1], t[:, -vit.n_patches:]], 1) if cls_token else t[:, -vit.n_patches:]
    return torch.stack([keep(outs[l]) for l in layers], 1).numpy()


@pytest.mark.parametrize('cls_token', [True, False])
def test_clip_shards_match_independent_forward(seg_root, tmp_path, cls_token):
    cfg = _cfg(seg_root, tmp_path, cls_token=cls_token, layers=(0, -1, 2), max_tokens_per_shard=(64 + cls_token) * 3 * 20)
    d = write_shards(cfg, progress=False)
    md = validate_shards(d)
    assert [s['n_examples'] for s in load_shard_info(d)] == [20, 20, 20, 4]  # several shards, partial last one
    assert md.layers == (0, 2, 3) and md.tokens_per_example == 64 + cls_token and md.d_model == 128
    vit = load_vit('clip', cfg.ckpt)
    ds = make_dataset(cfg.data, vit.img_transform, vit.seg_transform)
    np.testing.assert_allclose(_all_acts(d), _independent(vit, ds, [0, 2, 3], cls_token), rtol=1e-5, atol=1e-5)
    assert not np.asarray(open_shard(d, 3, md))[4:].any()  # padding of the last, partial shard
    lab = np.stack([pixel_to_patch_labels(ds[i]['labels'], 8)[0].numpy() for i in range(len(ds))])
    np.testing.assert_array_equal(open_labels(d), lab)
    assert open_labels(d).shape == (64, 64) and 0 < len(np.unique(lab)) <= 9


@pytest.mark.parametrize('name', ['vit_small_patch14_dinov2.lvd142m', 'vit_small_patch14_reg4_dinov2.lvd142m'])
def test_dinov2_shards_match_timm(seg_root, tmp_path, name):
    cfg = _cfg(seg_root, tmp_path, family='dinov2', ckpt=f'{name}/random', img_size=56, layers=(-2, 3), max_tokens_per_shard=17 * 2 * 30)
    d = write_shards(cfg, progress=False)
    md = validate_shards(d)
    assert (md.content_tokens_per_example, md.d_model, md.n_shards) == (16, 384, 3)
    vit = vit_for_shards(md)  # metadata has no image size: recovered from the patch count
    assert vit.img_size == (56, 56)
    ds = make_dataset(cfg.data, vit.img_transform, vit.seg_transform)
    x = torch.stack([ds[i]['image'] for i in range(len(ds))])
    with torch.inference_mode():
        _, inter = vit.model.forward_intermediates(x, indices=[3, 10], return_prefix_tokens=True, output_fmt='NLC')
    want = np.stack([torch.cat([pre[:, :1], pat], 1).numpy() for pat, pre in inter], 1)  # CLS + patches, registers dropped
    np.testing.assert_allclose(_all_acts(d), want, rtol=1e-4, atol=1e-4)


def test_exact_fill_writes_no_extra_shard(seg_root, tmp_path):
    d = write_shards(_cfg(seg_root, tmp_path, max_tokens_per_shard=65 * 2 * 32), progress=False)
    assert sorted(p.name for p in d.glob('acts*.bin')) == ['acts000000.bin', 'acts000001.bin']
    assert [s['n_examples'] for s in load_shard_info(d)] == [32, 32]


def _fake_saev():
    "A stand-in for saev's `saev.data.datasets` (its module path, class names, fields and defaults), as sys.modules entries."
    mod = types.ModuleType('saev.data.datasets')
    @dataclasses.dataclass(frozen=True)
    class ImgSegFolder:
        root: Path = Path('./data/segdataset')
        split: str = 'training'
        labels_csv: str = 'labels.csv'
        bg_label: int = 0
    @dataclasses.dataclass(frozen=True)
    class ImgFolder:
        root: Path = Path('./data/split')
    for c in (ImgSegFolder, ImgFolder): c.__module__, c.__qualname__ = mod.__name__, c.__name__; setattr(mod, c.__name__, c)
    return {'saev': types.ModuleType('saev'), 'saev.data': types.ModuleType('saev.data'), 'saev.data.datasets': mod}


def _saev_make_data_cfg(data: str, monkeypatch):
    "saev's `Metadata.make_data_cfg`, verbatim: `pickle.loads(base64.b64decode(self.data.encode('utf8')))`, with saev importable."
    for k, v in _fake_saev().items(): monkeypatch.setitem(sys.modules, k, v)
    return pickle.loads(base64.b64decode(data.encode('utf8'))), sys.modules['saev.data.datasets']


def test_metadata_is_saev_json_with_full_hash(seg_root, tmp_path, monkeypatch):
    d = write_shards(_cfg(seg_root, tmp_path), progress=False)
    raw = json.loads((d / 'metadata.json').read_text())
    assert set(raw) == {'family', 'ckpt', 'layers', 'content_tokens_per_example', 'cls_token', 'd_model', 'n_examples',
                        'max_tokens_per_shard', 'data', 'dataset', 'pixel_agg', 'dtype', 'protocol'}
    assert raw['protocol'] == '2.1' and isinstance(raw['data'], str) and raw['dataset'] == str(Path(seg_root).resolve())
    import hashlib
    # saev's rule: compact JSON in the dataclass's field order (orjson does not sort a dataclass's fields), as written
    assert list(raw) == list(Metadata.__dataclass_fields__)
    assert d.name == hashlib.sha256(json.dumps(raw, separators=(',', ':'), ensure_ascii=False).encode()).hexdigest()
    assert (d / 'metadata.json').read_text() == json.dumps(raw, indent=2)  # orjson's indent 2, no final newline
    assert (d / HASH_FNAME).read_text().strip() == d.name
    with pytest.raises(ModuleNotFoundError, match="No module named 'saev'"): pickle.loads(base64.b64decode(raw['data']))
    cfg, mod = _saev_make_data_cfg(raw['data'], monkeypatch)
    assert type(cfg) is mod.ImgSegFolder and cfg == mod.ImgSegFolder(root=Path(seg_root).resolve(), split='training')
    assert Metadata.load(d).data_fields == {'kind': 'img-seg-folder', 'root': str(Path(seg_root).resolve()), 'split': 'training',
                                            'labels_csv': 'labels.csv', 'bg_label': 0}


def test_data_field_both_forms_and_saev_pickles(tmp_path, monkeypatch):
    "Our base64 pickle decodes to saev's classes; saev's own pickle.dumps (protocol 4 and 2) and the old JSON dict read here."
    enc = encode_data({'kind': 'img-folder', 'root': tmp_path / 'imgs'})
    cfg, mod = _saev_make_data_cfg(enc, monkeypatch)
    assert cfg == mod.ImgFolder(root=(tmp_path / 'imgs').resolve())
    for proto in (2, 4, 5):  # what saev's `base64.b64encode(pickle.dumps(data))` writes
        saev_data = base64.b64encode(pickle.dumps(mod.ImgSegFolder(root=Path('/d/ade'), split='validation'), protocol=proto)).decode()
        assert decode_data(saev_data) == {'kind': 'img-seg-folder', 'root': '/d/ade', 'split': 'validation', 'labels_csv': 'labels.csv', 'bg_label': 0}
    md = Metadata.load(make_random_shards(tmp_path, n_examples=4, max_tokens_per_shard=2 * 17 * 2))
    assert md.data_fields == {'kind': 'random', 'seed': 0, 'n_classes': 8}  # generated shards keep the JSON dict form
    with pytest.raises(ShardError, match='not a saev data config'): decode_data(base64.b64encode(pickle.dumps(print)).decode())
    with pytest.raises(ShardError, match="not saev's base64"): decode_data('%%%')


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_half_storage(seg_root, tmp_path, dtype):
    d32 = write_shards(_cfg(seg_root, tmp_path), progress=False)
    d16 = write_shards(_cfg(seg_root, tmp_path, dtype=dtype), progress=False)
    md = validate_shards(d16)
    assert md.dtype == dtype and md.shard_nbytes * 2 == Metadata.load(d32).shard_nbytes
    a32 = torch.from_numpy(np.array(open_shard(d32, 0)))
    assert torch.equal(as_torch(np.asarray(open_shard(d16, 0)), dtype), a32.to(getattr(torch, dtype)))


def test_img_folder_has_no_labels(tmp_path):
    from PIL import Image
    for c in ['a', 'b']:
        (tmp_path / 'imgs' / c).mkdir(parents=True)
        for i in range(3): Image.fromarray(np.full((70, 80, 3), 40 * i, np.uint8)).save(tmp_path / 'imgs' / c / f'{i}.jpg')
    d = write_shards(ShardsConfig(data=ImgFolderConfig(root=tmp_path / 'imgs'), shards_root=tmp_path / 's', n_workers=0), progress=False)
    assert validate_shards(d).n_examples == 6 and open_labels(d) is None


def test_crash_midway_then_resume_is_byte_identical(seg_root, tmp_path):
    ref = write_shards(_cfg(seg_root, tmp_path, shards_root=tmp_path / 'ref'), progress=False)
    cfg = _cfg(seg_root, tmp_path, shards_root=tmp_path / 'crash')
    with pytest.raises(RuntimeError, match='simulated crash after 3 batches'): write_shards(cfg, progress=False, _crash_after=3)
    d = tmp_path / 'crash' / ref.name
    assert [s['n_examples'] for s in load_shard_info(d)] == [24]  # batches 0-1 fill shard 0; batch 2 is half of shard 1
    with pytest.raises(ShardError, match='incomplete'): validate_shards(d)
    assert write_shards(cfg, progress=False) == d
    for f in sorted(ref.iterdir()): assert f.read_bytes() == (d / f.name).read_bytes(), f.name


def _cli(*args, **kw):
    "The installed console script in a child process, with extra `subprocess.run` options (rlimits)."
    return subprocess.run([str(SAEV_NB), *map(str, args)], capture_output=True, text=True, cwd=ROOT, **kw)


def _main(*args):
    "The same command line in-process (`saev_nb.cli.main`): returns (the one error line or None, stdout lines)."
    import contextlib, io
    from saev_nb.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = main(list(map(str, args)))
    if rc == 0: return None, out.getvalue().splitlines()
    assert rc == 2, rc
    return err.getvalue().strip().splitlines()[-1], out.getvalue().splitlines()


def test_sigkill_then_rerun_same_command(seg_root, tmp_path):
    args = ['shards', '--shards-root', tmp_path / 'k', '--family', 'dinov2', '--ckpt', 'vit_small_patch14_reg4_dinov2.lvd142m/random',
            '--img-size', 112, '--layers', -1, '--batch-size', 4, '--n-workers', 0, '--max-tokens-per-shard', 65 * 8,
            'data:img-seg-folder', '--data.root', seg_root]
    p = subprocess.Popen([str(SAEV_NB), *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed_at, t0 = None, time.time()
    while p.poll() is None and time.time() - t0 < 120:
        js = list((tmp_path / 'k').glob('*/shards.json'))
        if js and len(json.loads(js[0].read_text())) >= 2: p.send_signal(signal.SIGKILL); killed_at = len(json.loads(js[0].read_text())); break
        time.sleep(0.02)
    p.wait()
    assert killed_at is not None and killed_at < 8, 'the run finished before it could be killed'
    d = js[0].parent
    with pytest.raises(ShardError, match='incomplete'): validate_shards(d)
    err, out = _main(*args)
    assert err is None and out[-1] == str(d)
    validate_shards(d)
    cfg = ShardsConfig(data=SegFolderConfig(root=seg_root), shards_root=tmp_path / 'ref', family='dinov2', ckpt='vit_small_patch14_reg4_dinov2.lvd142m/random',
                       img_size=112, layers=(-1,), batch_size=4, n_workers=0, max_tokens_per_shard=65 * 8)
    ref = write_shards(cfg, progress=False)
    assert ref.name == d.name
    for f in sorted(ref.iterdir()): assert f.read_bytes() == (d / f.name).read_bytes(), f.name


def test_n_jobs_2_local_submitit(seg_root, tmp_path):
    cfg = _cfg(seg_root, tmp_path, n_jobs=2, slurm=SlurmConfig(log_to=tmp_path / 'logs'), max_tokens_per_shard=65 * 2 * 16)
    d = write_shards(cfg, progress=False)
    assert [s['n_examples'] for s in load_shard_info(d)] == [16] * 4
    assert len(list((tmp_path / 'logs').glob('*_log.out'))) == 2  # two submitit jobs ran
    one = write_shards(dataclasses.replace(cfg, n_jobs=1, shards_root=tmp_path / 'one'), progress=False)
    np.testing.assert_allclose(_all_acts(d), _all_acts(one), rtol=1e-5, atol=1e-5)
    assert (d / 'labels.bin').read_bytes() == (one / 'labels.bin').read_bytes()


def test_validate_finds_problems(tmp_path):
    d = make_random_shards(tmp_path / 'r', n_examples=20, max_tokens_per_shard=17 * 2 * 8)
    assert validate_shards(d).n_shards == 3
    def broken(fn):
        import shutil
        b = tmp_path / 'b' / d.name
        if b.exists(): shutil.rmtree(b)
        shutil.copytree(d, b); fn(b); return b
    cases = [(lambda b: (b / 'acts000001.bin').unlink(), 'acts000001.bin: missing'),
             (lambda b: os.truncate(b / 'acts000002.bin', 100), 'acts000002.bin: truncated (100 bytes, expected'),
             (lambda b: (b / 'acts000003.bin').write_bytes(b'x'), 'acts000003.bin: extra shard file'),
             (lambda b: (b / 'shards.json').write_text(json.dumps(json.loads((b / 'shards.json').read_text())[:2])), 'incomplete, 1 of 3'),
             (lambda b: (b / 'shards.json').write_text(json.dumps([{**s, 'n_examples': 7} for s in json.loads((b / 'shards.json').read_text())])), 'says 7 examples, expected 8'),
             (lambda b: (b / 'labels.bin').write_bytes(b'\xff' * (20 * 16)), "label 255 above the class table's 7"),
             (lambda b: (b / 'labels.bin').write_bytes(b'\x08' * (20 * 16)), "label 8 above the class table's 7"),
             (lambda b: (b / 'metadata.json').write_bytes(b'{\xff}'), 'metadata.json: not UTF-8 text'),
             (lambda b: (b / 'metadata.json').write_text((b / 'metadata.json').read_text().replace('"d_model": 32', '"d_model": 16')),
              'metadata.json: edited after recording'),
             (lambda b: (b / 'shards.json').write_text('[{"name": '), 'shards.json: not a readable JSON list'),
             (lambda b: os.truncate(b / 'labels.bin', 10), 'labels.bin: 10 bytes'),
             (lambda b: (b / 'metadata.json').unlink(), 'metadata.json: missing')]
    for fn, msg in cases:
        with pytest.raises(ShardError, match=re.escape(msg)) as e: validate_shards(broken(fn))
        assert '\n' not in str(e.value)
    cli_fails('shards', 'validate', broken(cases[0][0]), contains='acts000001.bin: missing')
    for fn, msg in cases[6:9]:  # a label above the class table, bad bytes and an edit in metadata.json
        cli_in_process_fails('shards', 'validate', broken(fn), contains=msg)
    out = cli('shards', 'validate', d).stdout.splitlines()
    assert out[-1] == str(d) and out[0].startswith('ok: 20 examples') and 'finite: all 20 of 20 examples (680 of 680 token vectors)' in out[0]


@pytest.mark.parametrize('dtype,cls_token', [('float32', True), ('float16', False), ('bfloat16', True)])
def test_make_random_shards(tmp_path, dtype, cls_token):
    d = make_random_shards(tmp_path, n_examples=30, layers=(2, 5), d_model=8, content_tokens=4, cls_token=cls_token, dtype=dtype)
    md = validate_shards(d)
    assert md.dtype == dtype and md.layers == (2, 5) and md.tokens_per_example == 4 + cls_token and md.n_shards == 3
    assert make_random_shards(tmp_path, n_examples=30, layers=(2, 5), d_model=8, content_tokens=4, cls_token=cls_token, dtype=dtype) == d
    assert open_labels(d).max() < 8


# --- bad input: one clear line each, nothing half-written that looks complete --------------------------------------

def _bad(seg_root, tmp_path, *flags):
    err, _ = _main('shards', '--shards-root', tmp_path / 'shards', '--n-workers', 0, *flags, 'data:img-seg-folder', '--data.root', seg_root)
    assert err is not None and err.startswith('saev_nb shards: ') and '\n' not in err
    return err


def test_bad_input_in_a_real_process_is_one_line(seg_root, tmp_path):
    line = cli_fails('shards', '--shards-root', tmp_path / 'shards', '--layers', 9, 'data:img-seg-folder', '--data.root', seg_root)
    assert line == 'saev_nb shards: saev-tiny/scenes: layer 9 out of range for 4 blocks (valid: -4..3)'


def test_all_model_mismatches_in_one_message(seg_root, tmp_path):
    line = cli_fails('shards', '--shards-root', tmp_path / 'shards', '--d-model', 768, '--content-tokens-per-example', 196,
                     '--layers', 6, 7, 'data:img-seg-folder', '--data.root', seg_root)
    assert line.startswith('saev_nb shards: saev-tiny/scenes: 3 flags disagree with the model: d_model=768 given')
    assert 'content_tokens_per_example=196 given' in line and 'layer 6 out of range for 4 blocks' in line
    assert not (tmp_path / 'shards').exists()


@pytest.mark.parametrize('flags,msg', [
    (['--family', 'resnet'], "unknown family 'resnet'"),
    (['--ckpt', 'ViT-Q-1/random'], "unknown open_clip model 'ViT-Q-1'"),
    (['--ckpt', 'ViT-B-16/bogus'], "unknown pretrained tag 'bogus'"),
    (['--layers', 4], 'layer 4 out of range for 4 blocks'),
    (['--layers', -5], 'layer -5 out of range'),
    (['--d-model', 768], 'd_model=768 given but the model'),
    (['--content-tokens-per-example', 196], 'content_tokens_per_example=196 given'),
])
def test_bad_model_inputs(seg_root, tmp_path, flags, msg):
    assert msg in _bad(seg_root, tmp_path, *flags)
    assert not (tmp_path / 'shards').exists()  # nothing written before the checks pass


def test_bad_data_root(tmp_path):
    err, _ = _main('shards', '--shards-root', tmp_path / 's', 'data:img-seg-folder', '--data.root', tmp_path / 'nope')
    assert 'no such folder' in err and '\n' not in err


def test_unwritable_directory(seg_root, tmp_path):
    (tmp_path / 'afile').write_text('x')
    line = _bad(seg_root, tmp_path, '--shards-root', tmp_path / 'afile' / 'shards')
    assert 'cannot create or write the shard directory' in line and 'choose a writable --shards-root' in line
    if os.geteuid() != 0:
        (tmp_path / 'ro').mkdir(); os.chmod(tmp_path / 'ro', 0o500)
        assert 'cannot create or write' in _bad(seg_root, tmp_path, '--shards-root', tmp_path / 'ro')


def test_disk_full_file_size_limit(seg_root, tmp_path):
    "RLIMIT_FSIZE (bytes per file) in the child: the first shard file cannot be allocated; the directory stays incomplete."
    args = ['shards', '--shards-root', tmp_path / 'shards', '--n-workers', 0, '--max-tokens-per-shard', 65 * 2 * 24,
            '--layers', -1, 1, 'data:img-seg-folder', '--data.root', seg_root]
    lim = 65 * 2 * 24 * 128 * 4 - 1  # one byte less than one shard file
    r = _cli(*args, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (lim, lim)))
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
    assert 'disk full or file size limit hit' in r.stderr.strip().splitlines()[-1]
    d = next((tmp_path / 'shards').iterdir())
    with pytest.raises(ShardError): validate_shards(d)
    err, out = _main(*args)  # with space again, the same command completes the directory
    assert err is None and out[-1] == str(d) and validate_shards(d).n_examples == 64


def test_not_enough_free_space(seg_root, tmp_path, monkeypatch):
    import shutil, collections
    monkeypatch.setattr(writer_mod.shutil, 'disk_usage', lambda p: collections.namedtuple('du', 'total used free')(10**6, 10**6 - 1000, 1000))
    with pytest.raises(ShardError, match=r'needs 0.\d+ GB of disk but only 0.00 GB is free'): write_shards(_cfg(seg_root, tmp_path), progress=False)
    assert not list((tmp_path / 'shards').glob('*/acts*.bin'))


def test_existing_directory_with_other_metadata(seg_root, tmp_path):
    d = write_shards(_cfg(seg_root, tmp_path), progress=False)
    md = json.loads((d / 'metadata.json').read_text())
    (d / 'metadata.json').write_text(json.dumps({**md, 'n_examples': 999}))
    line = _bad(seg_root, tmp_path, '--layers', -1, 1, '--batch-size', 16, '--max-tokens-per-shard', 65 * 2 * 24)
    assert f'{d}: exists with different metadata (n_examples)' in line


def test_siglip_without_cls_is_an_error_with_cls(seg_root, tmp_path):
    with pytest.raises(Exception, match='no CLS token'):
        write_shards(_cfg(seg_root, tmp_path, ckpt='ViT-B-16-SigLIP/random'), progress=False)


def test_slurm_requested_without_slurm(seg_root, tmp_path, monkeypatch):
    monkeypatch.setattr(writer_mod.shutil, 'which', lambda name: None)
    with pytest.raises(UserError, match='--slurm-acct myacct given but Slurm is not available here'):  # jobs' one line
        write_shards(_cfg(seg_root, tmp_path, slurm=SlurmConfig(slurm_acct='myacct', slurm_partition='gpu'), n_jobs=2),
                     progress=False)


def test_bad_shard_budget_and_batch(seg_root, tmp_path):
    assert 'smaller than one example' in _bad(seg_root, tmp_path, '--max-tokens-per-shard', 50)
    assert 'batch_size=0' in _bad(seg_root, tmp_path, '--batch-size', 0)


# --- non-finite values, saev's layout, one writer per directory, files and workers ---------------------------------

def _scaled_tiny(tmp_path, scale=None, nan=False):
    "A weights file for saev-tiny whose last block adds `scale` to dim 0 of the residual (beyond float16), or NaN."
    vit = load_vit('clip', 'saev-tiny/random')
    sd = {k: v.clone() for k, v in vit.model.state_dict().items()}
    sd['transformer.resblocks.3.mlp.c_proj.bias'][0] = float('nan') if nan else scale
    fpath = tmp_path / ('nan.pt' if nan else 'big.pt'); torch.save(sd, fpath)
    return f'saev-tiny/{fpath}'


def test_writer_refuses_float16_overflow_and_nan(seg_root, tmp_path):
    base = ['shards', '--shards-root', tmp_path / 's', '--n-workers', 0, '--batch-size', 16, '--layers', -1]
    big = _scaled_tiny(tmp_path, scale=1e5)
    line = cli_fails(*base, '--dtype', 'float16', '--ckpt', big, 'data:img-seg-folder', '--data.root', seg_root,
                     contains='overflows float16 (largest 65504); record with --dtype float32 or bfloat16')
    assert 'at example 0, layer 3,' in line
    d = next((tmp_path / 's').iterdir())
    assert load_shard_info(d) == [] if (d / 'shards.json').exists() else True  # nothing listed as complete
    cli(*base, '--dtype', 'bfloat16', '--ckpt', big, 'data:img-seg-folder', '--data.root', seg_root)  # bf16 has the range
    cli_fails(*base, '--ckpt', _scaled_tiny(tmp_path, nan=True), 'data:img-seg-folder', '--data.root', seg_root,
              contains='the model produced nan at example 0')


def test_validate_scans_for_non_finite_values(tmp_path):
    d = make_random_shards(tmp_path, n_examples=300, layers=(0,), d_model=8, content_tokens=4, max_tokens_per_shard=100 * 5)
    md = Metadata.load(d)
    off = (1 * 5 + 2) * 8 * 4 + 3 * 4  # example 1 of shard 2 (global 201), token 2 (patch 1), dim 3: not in the 64-example sample
    with open(d / shard_name(2), 'r+b') as f: f.seek(off); f.write(np.array([np.nan], '<f4').tobytes())
    out = cli('shards', 'validate', d).stdout.splitlines()
    assert 'finite: a sample of 64 of 300 examples (320 of 1,500 token vectors); --full checks all' in out[0]
    cli_in_process_fails('shards', 'validate', '--full', d, contains=f'{d / shard_name(2)}: nan at example 201, layer 0, patch 1, dim 3')
    cli_in_process_fails('shards', 'validate', '--n-sample', 300, d, contains='nan at example 201')
    with pytest.raises(ShardError, match='nan at example 201'): validate_shards(d, scan='full')
    assert validate_shards(d, scan='none') == md
    for dtype, bad in [('float16', np.array([np.inf], '<f2')), ('bfloat16', np.array([0x7F80], '<u2'))]:  # bf16 +inf bits
        h = make_random_shards(tmp_path, n_examples=10, layers=(0,), d_model=8, content_tokens=4, dtype=dtype)
        with open(h / shard_name(0), 'r+b') as f: f.seek(2 * 5 * 8 * 2); f.write(bad.tobytes())
        with pytest.raises(ShardError, match='inf at example 2, layer 0, CLS, dim 0'): validate_shards(h)


def _as_saev(d, dst):
    "A saev-style copy of shard directory `d`: named by 8 hex of the hash, no recorded hash, plus saev's empty extra shard."
    md = Metadata.load(d)
    s = Path(shutil.copytree(d, dst / md.hash[:8]))
    (s / HASH_FNAME).unlink(); (s / WRITER_LOCK).unlink(missing_ok=True)
    if md.n_examples % md.examples_per_shard == 0:
        shutil.copy(s / shard_name(0), s / shard_name(md.n_shards))
        (s / 'shards.json').write_text(json.dumps(load_shard_info(s) + [{'name': shard_name(md.n_shards), 'n_examples': 0}]))
    return s


def test_saev_naming_renames_symlinks_and_edits(seg_root, tmp_path):
    d = write_shards(_cfg(seg_root, tmp_path, max_tokens_per_shard=65 * 2 * 32), progress=False)  # an exact fill: 2 x 32
    s = _as_saev(d, tmp_path / 'saev' / 'shards')
    assert cli('shards', 'validate', s).stdout.splitlines()[0].startswith('ok: 64 examples')
    (tmp_path / 'link').symlink_to(s)
    renamed = Path(shutil.copytree(d, tmp_path / 'renamed'))
    for x in (tmp_path / 'link', renamed): assert validate_shards(x) == Metadata.load(d)
    no_record = Path(shutil.copytree(s, tmp_path / 'renamed-saev'))
    line = cli_fails('shards', 'validate', no_record, contains=f'name it (or a symlink to it) {Metadata.load(d).hash[:8]}')
    assert 'rewrite' not in line
    md_txt = (renamed / 'metadata.json').read_text()
    (renamed / 'metadata.json').write_text(md_txt.replace('"layers": [\n    1,', '"layers": [\n    2,'))
    cli_in_process_fails('shards', 'validate', renamed, contains='metadata.json: edited after recording')


def test_second_writer_refused_naming_the_holder_or_waits(seg_root, tmp_path):
    args = ['shards', '--shards-root', tmp_path / 's', '--n-workers', 0, '--layers', -1, 1, '--batch-size', 16,
            '--max-tokens-per-shard', 65 * 2 * 24, 'data:img-seg-folder', '--data.root', seg_root]
    d = tmp_path / 's' / Metadata.load(write_shards(_cfg(seg_root, tmp_path, shards_root=tmp_path / 'ref'), progress=False)).hash
    import socket
    with writer_lock(d):  # another writer (this test process) records into d
        line = cli_fails(*args, contains=f'{d}: another writer is recording into it (pid {os.getpid()} on {socket.gethostname()}')
        assert '--wait' in line
    lock = writer_lock(d); lock.__enter__()
    p = subprocess.Popen([str(SAEV_NB), *map(str, args), '--wait'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, 'TQDM_DISABLE': '1'})
    seen = []
    while (line := p.stderr.readline()) and 'waiting for the other writer' not in line: seen.append(line)
    assert 'waiting for the other writer' in line and p.poll() is None, seen  # it waits while the lock is held
    lock.__exit__(None, None, None)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0 and out.strip() == str(d), err
    assert (d / WRITER_LOCK).read_text() == ''  # released and cleared


def test_killing_the_parent_stops_local_jobs(seg_root, tmp_path):
    args = ['shards', '--shards-root', tmp_path / 'k', '--family', 'dinov2', '--ckpt', 'vit_small_patch14_reg4_dinov2.lvd142m/random',
            '--img-size', 112, '--layers', -1, '--batch-size', 2, '--n-workers', 0, '--max-tokens-per-shard', 65 * 4,
            '--n-jobs', 2, '--log-to', tmp_path / 'logs', 'data:img-seg-folder', '--data.root', seg_root]
    p = subprocess.Popen([str(SAEV_NB), *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    def jobs_running():
        fs = list((tmp_path / 'k').glob('*/.jobs.lock'))
        if not fs: return False
        with open(fs[0]) as f:
            try: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); return False
            except BlockingIOError: return True
    t0 = time.time()
    while not jobs_running() and p.poll() is None and time.time() - t0 < 120: time.sleep(0.05)
    assert p.poll() is None, 'the run finished before its jobs could be seen'
    p.kill(); p.wait()
    t0 = time.time()
    while jobs_running() and time.time() - t0 < 10: time.sleep(0.1)
    assert not jobs_running(), 'local jobs kept writing after their parent was killed'
    d = next((tmp_path / 'k').iterdir())
    r = cli(*args)  # the rerun completes the directory
    assert r.stdout.strip() == str(d) and validate_shards(d).n_examples == 64


def test_umask_and_leftover_tmp_files(seg_root, tmp_path):
    args = ['shards', '--shards-root', tmp_path / 's', '--n-workers', 0, '--layers', -1, '--batch-size', 32,
            'data:img-seg-folder', '--data.root', seg_root]
    r = _cli(*args, preexec_fn=lambda: os.umask(0o002))
    assert r.returncode == 0, r.stderr
    d = Path(r.stdout.strip())
    for name in ('metadata.json', 'shards.json', 'labels.bin', shard_name(0)):
        assert (d / name).stat().st_mode & 0o777 == 0o664, name
    (d / '.tmp.999.shards.json').write_text('half')
    cli(*args)
    assert not list(d.glob('.tmp.*'))


def test_data_error_in_a_worker_is_one_line(seg_root, tmp_path):
    root = Path(shutil.copytree(seg_root, tmp_path / 'data'))
    ann = sorted((root / 'annotations' / 'training').iterdir())[5]
    ann.write_bytes(b'not a png')
    cli_fails('shards', '--shards-root', tmp_path / 's', '--n-workers', 2, '--batch-size', 8, 'data:img-seg-folder',
              '--data.root', root, contains=f'{ann}: unreadable or corrupt annotation')


# --- the readers' shared pieces: a shard set, the non-finite locator, the images of a shard set -----------------------

def test_shard_set_opens_and_resolves_layer_and_tokens(tmp_path):
    from saev_nb.shards import ShardSet
    d = make_random_shards(tmp_path, layers=(2, 5))
    ss = ShardSet(d)
    md = ss.open()
    assert ss.resolve(md) == (5, 'content')  # nothing set: the last recorded layer, the patches
    assert ss.resolve(md, layer=2, tokens='all') == (2, 'all')  # the caller's fallbacks (e.g. an SAE's)
    assert ShardSet(d, layer=2, tokens='cls').resolve(md, layer=5) == (2, 'cls')  # its own fields win
    with pytest.raises(ShardError, match=r'layer 3 was not recorded \(layers: \[2, 5\]\); pass one of those as --data.layer'):
        ShardSet(d, layer=3).resolve(md, flag='--data.layer')
    with pytest.raises(ShardError, match='not a directory'): ShardSet(tmp_path / 'nowhere').open()


def test_one_locator_names_shard_file_example_layer_and_token(tmp_path):
    from saev_nb.shards import NonFiniteError, check_finite, nonfinite_where
    d = make_random_shards(tmp_path, n_examples=64)  # 25 examples per shard
    md = Metadata.load(d)
    x = torch.zeros(3, 4); x[1, 2] = float('inf')
    ex, tok = torch.tensor([3, 30, 40]), torch.tensor([0, -1, 5])
    assert nonfinite_where(x, ex, tok, md, d, 1) == f'{d / shard_name(1)}: inf at example 30, layer 1, CLS'
    assert nonfinite_where(torch.zeros(3, 4), ex, tok, md, d, 1) is None
    x_etd = torch.zeros(2, 17, 4); x_etd[1, 3, 0] = float('nan')  # whole examples of the `all` set: CLS first
    assert nonfinite_where(x_etd, torch.tensor([50, 51]), md=md, dpath=d, tokens='all').endswith('example 51, patch 2')
    with pytest.raises(NonFiniteError, match=r'step 7: .*acts000002.bin: nan at example 51, patch 3; list every '
                                             r'non-finite value with `saev_nb shards validate --full'):
        check_finite(x_etd, torch.tensor([50, 51]), md=md, dpath=d, context='step 7: ')
    class Mine(UserError): pass
    with pytest.raises(Mine): check_finite(x, ex, tok, md, d, error=Mine)


def test_recorded_images_of_a_shard_set(seg_root, tmp_path):
    from saev_nb.shards import recorded_images
    from saev_nb.core import MissingFileError
    d = write_shards(_cfg(seg_root, tmp_path, layers=(1,), data=SegFolderConfig(seg_root, 'validation')), progress=False)
    md = Metadata.load(d)
    assert recorded_images(md) == SegFolderConfig(seg_root.resolve(), 'validation')
    assert recorded_images(md, split='training').split == 'training'
    with pytest.raises(MissingFileError, match='data set of the shards not found; pass --imgs.root DIR if it moved'):
        recorded_images(md, root=tmp_path / 'moved', flag='--imgs.root')
    with pytest.raises(ShardError, match="data kind 'random' is not an image data set"):
        recorded_images(Metadata.load(make_random_shards(tmp_path)))


def test_no_split_records_training(seg_root, tmp_path):
    "`SegFolderConfig.split` is None by default; recording reads and records `training`, as before."
    d = write_shards(_cfg(seg_root, tmp_path, layers=(1,)), progress=False)
    ref = write_shards(_cfg(seg_root, tmp_path / 'ref', layers=(1,), data=SegFolderConfig(seg_root, 'training')),
                       progress=False)
    assert d.name == ref.name and Metadata.load(d).data_fields['split'] == 'training'


def test_moved_writer_names_still_import_from_shards():
    "Transitional: the writer's names resolve from `saev_nb.shards` until every caller imports `saev_nb.writer`."
    import saev_nb.shards as shards_mod
    from saev_nb.writer import ShardsConfig as Old, write_shards as old_write
    assert (Old, old_write) == (ShardsConfig, write_shards)
    with pytest.raises(AttributeError): shards_mod.no_such_name
