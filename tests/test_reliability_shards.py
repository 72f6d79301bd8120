"Issue 23, shards/loaders/SAE part: each case through the installed console script, exit 2 with one stderr line."
import dataclasses, hashlib, io, json, os, time
from pathlib import Path

import pytest
import torch

from saev_nb.shards import HASH_FNAME, Metadata, make_random_shards
from saev_nb.writer import IMAGES_FNAME
from saev_nb.sae import SAE, SAEConfig, TopK, save_sae
from helpers import cli, cli_fails as _cli_fails, cli_in_process_fails

NO_BARS = {'TQDM_DISABLE': '1'}

def cli_fails(*args, contains=''):
    return _cli_fails(*args, contains=contains, env=NO_BARS)

def _digests(dpath: Path) -> dict:
    "sha256 of every file in a directory (to show that a refusal wrote nothing)."
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(dpath.iterdir()) if p.is_file()}

def _shards_args(root, shards_root):
    return ['shards', '--shards-root', shards_root, '--layers', -1, '--batch-size', 8, '--n-workers', 0,
            'data:img-seg-folder', '--data.root', root]

def _random(tmp_path, **kw):
    return make_random_shards(tmp_path / 'r', **{'n_examples': 64, 'layers': (0, 1), 'd_model': 32,
                                                 'content_tokens': 16, **kw})


# --- 4: regenerated images under the same root ---------------------------------------------------------------------

@pytest.fixture
def recorded(tmp_path):
    "make-data, then shards: (data root, shard directory, shard-root)."
    root = tmp_path / 'ade'
    cli('make-data', '--root', root, '--n-train', 6, '--n-val', 2, '--size', 64)
    d = Path(cli(*_shards_args(root, tmp_path / 'shards'), env=NO_BARS).stdout.strip().splitlines()[-1])
    return root, d, tmp_path / 'shards'

def test_regenerated_images_are_refused(recorded, tmp_path):
    root, d, shards_root = recorded
    assert (d / IMAGES_FNAME).is_file() and 'images' not in json.loads((d / 'metadata.json').read_text())
    assert cli(*_shards_args(root, shards_root), env=NO_BARS).stdout.strip().splitlines()[-1] == str(d)  # same images
    before = _digests(d)
    time.sleep(0.05)  # the same scenes written again (new times, same bytes), as the paper notebook's rerun does
    cli('make-data', '--root', root, '--n-train', 6, '--n-val', 2, '--size', 64)
    assert cli(*_shards_args(root, shards_root), env=NO_BARS).stdout.strip().splitlines()[-1] == str(d)
    assert _digests(d) == before
    cli('make-data', '--root', root, '--n-train', 6, '--n-val', 2, '--size', 64, '--seed', 1)
    line = cli_fails(*_shards_args(root, shards_root), contains=f'{d / IMAGES_FNAME}: the images under {root}')
    assert 'changed since these shards were recorded' in line and 'pass a new --shards-root, or delete' in line
    assert _digests(d) == before  # nothing rewritten
    fresh = cli(*_shards_args(root, tmp_path / 'new'), env=NO_BARS).stdout.strip().splitlines()[-1]
    assert (Path(fresh) / 'acts000000.bin').read_bytes() != (d / 'acts000000.bin').read_bytes()


# --- 7: metadata claiming 10^12 examples with a matching recorded hash ---------------------------------------------

@pytest.mark.parametrize('labels', [True, False])
def test_validate_forged_huge_metadata_is_quick(tmp_path, labels):
    d = _random(tmp_path, labels=labels)
    forged = dataclasses.replace(Metadata.load(d), n_examples=10**12)
    forged.dump(d)  # metadata.json and metadata.sha256 both: the hash check passes
    assert (d / HASH_FNAME).read_text().strip() == forged.hash
    t0 = time.monotonic()
    r = cli('shards', 'validate', d, check=False, timeout=30)
    took = time.monotonic() - t0
    from helpers import one_line_failure
    line = one_line_failure(r, 'labels.bin: ' if labels else 'incomplete, 39999999997 of 40000000000 shards')
    assert took < 20, took  # an interpreter start-up; it used to build 5x10^7 names (>60 s, 8 GB)
    if labels: assert 'n_examples 1000000000000' in line


# --- 9: devices as checkpoints ---------------------------------------------------------------------------------------

def test_dev_zero_as_run_is_refused(tmp_path):
    d = _random(tmp_path)
    r = cli('inference', '--run', '/dev/zero', '--data.shards', d, check=False, timeout=60, env=NO_BARS)
    from helpers import one_line_failure
    one_line_failure(r, '/dev/zero: not a regular file')  # core.checked_file's words


# --- 11: tracebacks that become one line -----------------------------------------------------------------------------

def test_non_utf8_data_root(tmp_path):
    ok = tmp_path / 'ok'
    cli('make-data', '--root', ok, '--n-train', 2, '--n-val', 1, '--size', 64)
    bad = Path(os.fsdecode(bytes(tmp_path) + b'/caf\xe9'))
    os.rename(ok, bad)
    line = cli_fails(*_shards_args(bad, tmp_path / 'shards'), contains='the path has bytes that are not UTF-8')
    assert '\\xe9' in line and '--data.root' in line
    assert not (tmp_path / 'shards').exists()  # refused before anything is written

def test_path_names_in_shards_json(recorded):
    root, d, shards_root = recorded
    (d / 'shards.json').write_text(json.dumps([{'name': '../../etc/passwd', 'n_examples': 6}]))
    cli_fails(*_shards_args(root, shards_root), contains="shards.json: damaged, lists '../../etc/passwd'")
    cli_fails('shards', 'validate', d, contains="shards.json: lists ['../../etc/passwd']")

def _sae_file(tmp_path, name, body: bytes) -> Path:
    fpath = tmp_path / name; fpath.write_bytes(body); return fpath

def _saev_header() -> bytes:
    return (json.dumps({'schema': 5, 'cfg': {'d_model': 32, 'd_sae': 64, 'activation': {'cls': 'Relu', 'params': {}}}})
            + '\n').encode()

class _Evil:
    def __init__(self, fpath): self.fpath = fpath
    def __reduce__(self): return (os.system, (f'touch {self.fpath}',))

def test_broken_checkpoints_are_one_line(tmp_path):
    d, pwned = _random(tmp_path), tmp_path / 'pwned'
    evil = io.BytesIO(); torch.save({'W_enc': _Evil(pwned)}, evil)
    other = io.BytesIO(); torch.save({'W_enc': torch.zeros(3)}, other)
    good = save_sae(SAE(SAEConfig(d_model=32, d_sae=64)), tmp_path / 'good.safetensors')
    wrong_keys = tmp_path / 'keys.safetensors'
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(str(good), 'pt') as f: meta = f.metadata()
    save_file({'W_enc': load_file(str(good))['W_enc']}, str(wrong_keys), metadata=meta)
    cases = {_sae_file(tmp_path, 'empty.safetensors', b''): 'empty file, not an SAE checkpoint',
             _sae_file(tmp_path, 'empty.pt', b''): 'empty file, not an SAE checkpoint',
             wrong_keys: "not the tensors of the SAE its config describes (missing ['W_dec'",
             _sae_file(tmp_path, 'evil.pt', _saev_header() + evil.getvalue()): 'holds objects other than tensors',
             _sae_file(tmp_path, 'headonly.pt', _saev_header()): 'the state dict after the header is damaged',
             _sae_file(tmp_path, 'other.pt', _saev_header() + other.getvalue()): "(missing ['W_dec'"}
    for fpath, msg in cases.items():
        line = cli_in_process_fails('inference', '--run', fpath, '--data.shards', d, contains=msg, env=NO_BARS)
        assert line.startswith(f'saev_nb inference: {fpath}: '), line
    cli_fails('inference', '--run', tmp_path / 'evil.pt', '--data.shards', d, contains='nothing in it was run')
    assert not pwned.exists()

def test_all_zero_activations_with_scale_norm(tmp_path):
    d = _random(tmp_path)
    for fp in d.glob('acts*.bin'): fp.write_bytes(bytes(fp.stat().st_size))
    line = cli_fails('train', '--runs-root', tmp_path / 'runs', '--train-data.shards', d, '--train-data.layer', 1,
                     '--train-data.scale-norm', '--val-data.shards', d, '--val-data.layer', 1, '--sae.d-model', 32,
                     '--sae.exp-factor', 2, '--n-train', 1024, '--n-val', 256, '--train-data.batch-size', 256,
                     '--val-data.batch-size', 256, '--n-lr-warmup', 1, contains=f'{d}: the ')
    assert 'tokens of layer 1 are all zero, so they cannot be scaled' in line

@pytest.mark.parametrize('field', ['content_tokens_per_example', 'tokens_per_example'])
def test_edited_token_counts(tmp_path, field):
    d = _random(tmp_path)
    md = json.loads((d / 'metadata.json').read_text())
    md[field] = 3
    (d / 'metadata.json').write_text(json.dumps(md))
    want = 'edited after recording' if field == 'content_tokens_per_example' else 'metadata.json'
    cli_fails('shards', 'validate', d, contains=want)
    cli_fails('train', '--runs-root', tmp_path / 'runs', '--train-data.shards', d, '--train-data.layer', 1,
              '--val-data.shards', d, '--val-data.layer', 1, '--sae.d-model', 32, '--n-train', 1024,
              '--train-data.batch-size', 64, '--val-data.batch-size', 64, '--n-lr-warmup', 1, contains=want)


# --- 12: modes, and "cannot read" told from "damaged" ---------------------------------------------------------------

def test_sae_file_follows_umask(tmp_path):
    old = os.umask(0o022)
    try: fpath = save_sae(SAE(SAEConfig(d_model=8, d_sae=16, activation=TopK(top_k=2))), tmp_path / 'sae.safetensors')
    finally: os.umask(old)
    assert fpath.stat().st_mode & 0o777 == 0o644

def test_unreadable_checkpoint_says_cannot_read(tmp_path, monkeypatch):
    d = _random(tmp_path)
    fpath = save_sae(SAE(SAEConfig(d_model=32, d_sae=64)), tmp_path / 'sae.safetensors')
    if os.geteuid() != 0:  # a real permission problem, through the installed script
        os.chmod(fpath, 0)
        line = cli_fails('inference', '--run', fpath, '--data.shards', d, contains='cannot read (permission denied')
    else:  # root reads everything: the same refusal in-process, with open() denied
        import builtins, saev_nb.sae as sae_mod
        real_open = builtins.open
        def denied(f, *a, **k):
            if Path(f) == fpath: raise PermissionError(13, 'Permission denied', str(f))
            return real_open(f, *a, **k)
        monkeypatch.setattr(sae_mod, 'open', denied, raising=False)
        line = cli_in_process_fails('inference', '--run', fpath, '--data.shards', d,
                                    contains='cannot read (permission denied', env=NO_BARS)
    assert '--restart' not in line and 'damaged' not in line and 'ask its owner' in line
