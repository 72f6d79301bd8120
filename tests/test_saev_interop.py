"""Interop with saev's own files: a shard directory saev's code wrote (`shared/fixtures/saev-written/71c0c059`,
completed with acts files of known values) validates and loads as written, without renaming; saev's directory hash,
its metadata.json bytes, negative recorded layers, and saev-format checkpoints through the installed command."""
import csv, json, shutil, warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from saev_nb.shards import HASH_FNAME, Metadata, make_random_shards, shard_name
from saev_nb.loaders import IndexedDataset, ShuffledConfig, ShuffledLoader
from saev_nb.sae import SAE, SAEConfig, TopK, save_saev_checkpoint
from helpers import cli, cli_fails

FIXTURE = Path(__file__).resolve().parents[2] / 'shared' / 'fixtures' / 'saev-written'
SAEV_HASH = '71c0c059'
needs_fixture = pytest.mark.skipif(not (FIXTURE / SAEV_HASH / 'metadata.json').is_file(),
                                   reason=f'{FIXTURE} absent: CI places shared/ beside the clone (../shared)')


def complete_saev_dir(dst_root: Path, metadata: dict | None = None) -> tuple[Path, np.ndarray]:
    """Copy saev's directory (not renamed, or named by saev's hash of the edited `metadata`) under
    `dst_root/saev/shards/`, write its acts files at full shard size as saev allocates them, filled with known values;
    returns the directory and the (n_examples, n_layers, tokens, d_model) values."""
    src = FIXTURE / SAEV_HASH
    md = Metadata(**(metadata or json.loads((src / 'metadata.json').read_text())))
    name = SAEV_HASH if metadata is None else md.saev_hash[:8]
    d = dst_root / 'saev' / 'shards' / name
    d.mkdir(parents=True)
    for f in ('metadata.json', 'shards.json', 'labels.bin'): shutil.copyfile(src / f, d / f)
    if metadata is not None: (d / 'metadata.json').write_text(json.dumps(metadata, indent=2))
    known = np.random.default_rng(0).standard_normal((md.n_examples, *md.shard_shape[1:]), dtype=np.float32)
    info = json.loads((d / 'shards.json').read_text())
    for i, s in enumerate(info):
        lo = i * md.examples_per_shard
        mm = np.memmap(d / s['name'], dtype=np.float32, mode='w+', shape=md.shard_shape)  # full shape, like saev
        mm[:s['n_examples']] = known[lo:lo + s['n_examples']]
        mm.flush(); del mm
    return d, known


@needs_fixture
def test_saev_hash_names_saev_directory():
    md = Metadata.load(FIXTURE / SAEV_HASH)
    assert md.saev_hash[:8] == SAEV_HASH and md.hash == md.saev_hash and md.legacy_hash[:8] != SAEV_HASH


@needs_fixture
def test_dump_reproduces_saev_metadata_bytes(tmp_path):
    Metadata.load(FIXTURE / SAEV_HASH).dump(tmp_path)
    assert (tmp_path / 'metadata.json').read_bytes() == (FIXTURE / SAEV_HASH / 'metadata.json').read_bytes()


@needs_fixture
def test_saev_directory_validates_and_loads_as_written(tmp_path):
    d, known = complete_saev_dir(tmp_path)
    md = Metadata.load(d)
    assert (d / shard_name(1)).stat().st_size == md.shard_nbytes  # the last, partial shard at full size too
    r = cli('shards', 'validate', d, '--full')
    assert r.stdout.strip().splitlines()[-1] == str(d) and r.stdout.startswith('ok: 12 examples x 2 layers')
    labels = np.fromfile(d / 'labels.bin', dtype=np.uint8).reshape(md.n_examples, md.content_tokens_per_example)
    ds = IndexedDataset(d, 11)  # layer 11 is index 1 of the recorded [10, 11]
    idx = np.arange(len(ds))
    b = ds[idx]
    ex, tok = b['example_idx'].numpy(), b['token_idx'].numpy()
    assert len(ds) == 12 * 196 and np.array_equal(b['acts'].numpy(), known[ex, 1, 1 + tok])
    assert np.array_equal(b['labels'].numpy(), labels[ex, tok])
    cls = IndexedDataset(d, 10, 'cls')[np.arange(12)]
    assert np.array_equal(cls['acts'].numpy(), known[:, 0, 0])
    dl = ShuffledLoader(ShuffledConfig(shards=d, layer=10, batch_size=500, n_threads=1))
    seen = 0
    for batch in dl:
        ex, tok = batch['example_idx'].numpy(), batch['token_idx'].numpy()
        assert np.array_equal(batch['acts'].numpy(), known[ex, 0, 1 + tok])
        assert np.array_equal(batch['labels'].numpy(), labels[ex, tok])
        seen += len(ex)
    assert seen == 12 * 196


@needs_fixture
def test_negative_recorded_layers_resolve_by_block(tmp_path):
    "saev records `--layers -2` as -2: on the 12-block ViT-B/16, `--layer 10` and `--layer -2` both read it."
    meta = {**json.loads((FIXTURE / SAEV_HASH / 'metadata.json').read_text()), 'layers': [-2, -1]}
    d, known = complete_saev_dir(tmp_path, meta)
    md = Metadata.load(d)
    assert [md.resolve_layer(l) for l in (10, -2, 11, -1, None)] == [-2, -2, -1, -1, -1]
    b = IndexedDataset(d, md.resolve_layer(10))[np.arange(196)]
    assert np.array_equal(b['acts'].numpy(), known[0, 0, 1:])
    cli('shards', 'validate', d)  # named by saev's hash of the edited metadata
    sae_fpath = save_saev_checkpoint(SAE(SAEConfig(d_model=768, d_sae=64, activation=TopK(top_k=8))),
                                     tmp_path / 'sae.pt')
    for layer in ('10', '-2'):
        r = cli('inference', '--run', sae_fpath, '--data.shards', d, '--data.layer', layer, '--force',
                env={'TQDM_DISABLE': '1'})
        assert '(2352 tokens' in r.stdout, r.stdout
    cli_fails('inference', '--run', sae_fpath, '--data.shards', d, '--data.layer', '9',
              contains='layer 9 was not recorded (layers: [-2, -1])')


def test_legacy_directory_stays_valid(tmp_path):
    "A directory written before the hash matched saev: sorted-keys metadata.json, named and recorded by that hash."
    d = make_random_shards(tmp_path / 'new', n_examples=10)
    md = Metadata.load(d)
    old = tmp_path / 'old' / md.legacy_hash
    shutil.copytree(d, old)
    (old / 'metadata.json').write_text(json.dumps(md.to_dict(), sort_keys=True, indent=2))
    (old / HASH_FNAME).write_text(md.legacy_hash + '\n')
    assert cli('shards', 'validate', old).stdout.strip().splitlines()[-1] == str(old)
    renamed = old.rename(tmp_path / 'old' / 'renamed')  # known by its recorded legacy hash
    cli('shards', 'validate', renamed)
    (renamed / HASH_FNAME).unlink()
    cli_fails('shards', 'validate', renamed, contains=f'name it (or a symlink to it) {md.saev_hash[:8]}')
    short = renamed.rename(tmp_path / 'old' / md.legacy_hash[:8])  # the 8 hex an older message asked for
    cli('shards', 'validate', short)
    (short / HASH_FNAME).write_text(md.legacy_hash + '\n')
    meta = json.loads((short / 'metadata.json').read_text()); meta['n_examples'] = 9
    (short / 'metadata.json').write_text(json.dumps(meta))
    cli_fails('shards', 'validate', short, contains='edited after recording')


def test_saev_checkpoint_warns_through_inference(tmp_path):
    "A saev TopK checkpoint whose k is a large part of the width warns (one line) when `inference` loads it."
    d = make_random_shards(tmp_path / 'shards', n_examples=8, layers=(0, 1), d_model=32, content_tokens=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        f = save_saev_checkpoint(SAE(SAEConfig(d_model=32, d_sae=64, activation=TopK(top_k=20))), tmp_path / 'k.pt')
    assert len(caught) == 1 and 'top_k=20 is above 0.25 of d_sae=64' in str(caught[0].message)
    r = cli('inference', '--run', f, '--data.shards', d, '--data.layer', 1, env={'TQDM_DISABLE': '1'})
    warn = [l for l in r.stderr.splitlines() if l.startswith('warning: ')]
    assert len(warn) == 1 and f'{f}: top_k=20' in warn[0] and 'negative' in warn[0], r.stderr
    f8 = save_saev_checkpoint(SAE(SAEConfig(d_model=32, d_sae=64, activation=TopK(top_k=8))), tmp_path / 'k8.pt')
    r = cli('inference', '--run', f8, '--data.shards', d, '--data.layer', 1, env={'TQDM_DISABLE': '1'})
    assert 'warning' not in r.stderr, r.stderr


def test_make_data_writes_saev_labels_csv(tmp_path):
    "saev's ImgSegFolder needs `<root>/labels.csv`: first column `stem`, a row for every image of both splits."
    root = tmp_path / 'ADEChallengeData2016'
    cli('make-data', '--root', root, '--n-train', 3, '--n-val', 2, env={'TQDM_DISABLE': '1'})
    with open(root / 'labels.csv', newline='') as fd:  # read as saev reads it
        reader = csv.DictReader(fd)
        rows = list(reader)
    assert reader.fieldnames[0] == 'stem' and len(reader.fieldnames) >= 2
    assert sorted(r['stem'] for r in rows) == sorted(p.stem for p in root.glob('images/*/*.jpg'))
    assert len(rows) == 5 and all(r['scene'] for r in rows)
