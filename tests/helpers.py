"Shared helpers for the pytest suite: run the installed console script in a subprocess, or a CLI function in-process."
import os, subprocess, sys, typing
from pathlib import Path

import tyro

SAEV_NB = Path(sys.executable).with_name('saev_nb')  # the console script pip installed next to this interpreter

def cli(*args, check=True, env=None, timeout=900, input=None):
    "The installed `saev_nb` console script in a subprocess; with `check`, asserts exit 0 and returns the result."
    r = subprocess.run([str(SAEV_NB), *map(str, args)], capture_output=True, text=True, timeout=timeout, input=input,
                       env={**os.environ, **(env or {})})
    if check: assert r.returncode == 0, f'exit {r.returncode}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-3000:]}'
    return r

def one_line_failure(r: subprocess.CompletedProcess, contains: str = '') -> str:
    "Asserts exit 2 and one line on stderr starting `saev_nb <cmd>:` and containing `contains`; returns that line."
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, f'exit {r.returncode}\nstderr: {r.stderr[-3000:]}'
    assert len(lines) == 1 and lines[0].startswith('saev_nb '), f'not one line:\n{r.stderr[-3000:]}'
    assert 'Traceback' not in r.stderr and contains in lines[0], lines[0]
    return lines[0]

def cli_fails(*args, contains='', env=None):
    "The console script on bad input: exit 2, one line on stderr starting `saev_nb <cmd>:` and containing `contains`."
    return one_line_failure(cli(*args, check=False, env=env), contains)

def run(fn, *args):
    "A CLI function with its config parsed by tyro from `args`, in-process (saves the interpreter start-up)."
    return fn(tyro.cli(typing.get_type_hints(fn)['cfg'], args=[str(a) for a in args]))

def tiny_shards(dpath, seed=1):
    """Tiny generated easy scenes (48 train / 16 val, 4 classes) recorded at blocks 2 and 3 of the random-init control
    `saev-tiny/random`, named explicitly: tests that rebuild the stream load that model, and the fixtures stay the same
    whatever the default checkpoint is."""
    from saev_nb.data import SegFolderConfig, make_scenes
    from saev_nb.writer import ShardsConfig, write_shards
    root = make_scenes(dpath/'ADEChallengeData2016', 48, 16, seed=seed, size=96, n_classes=4, progress=False)
    sh = {s: write_shards(ShardsConfig(data=SegFolderConfig(root, s), shards_root=dpath/'shards', ckpt='saev-tiny/random',
                                       layers=(2, 3), batch_size=32, n_workers=0), progress=False)
          for s in ('training', 'validation')}
    return {'root': root, 'train': sh['training'], 'val': sh['validation'], 'dpath': dpath}

def cli_in_process(*args, check=True, env=None):
    """`cli` without the interpreter start-up (seconds per call): `saev_nb.cli.main` in this process, its stdout and
    stderr captured (warnings in the command's own one-line form) in a `CompletedProcess`.
    For tests that run a command many times; keep at least one `cli` test per command for the installed script.
    `env` is set in `os.environ` for the call (read at call time, like `progress_bar`'s TQDM_DISABLE), then restored."""
    import contextlib, io, warnings
    from saev_nb.cli import main
    out, err = io.StringIO(), io.StringIO()
    old = {k: os.environ.get(k) for k in env or {}}
    try:
        os.environ.update(env or {})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.resetwarnings()  # the filters of a fresh interpreter: each warning once per place, these hidden
            for cat in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter('ignore', cat)
            rc = main([str(a) for a in args])  # main's own one-line format writes warnings to the captured stderr
    finally:
        for k, v in old.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v
    r = subprocess.CompletedProcess(['saev_nb', *map(str, args)], rc, out.getvalue(), err.getvalue())
    if check: assert rc == 0, f'exit {rc}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-3000:]}'
    return r

def cli_in_process_fails(*args, contains='', env=None):
    "`cli_fails` in-process: exit 2, one stderr line starting `saev_nb <cmd>:` and containing `contains`."
    return one_line_failure(cli_in_process(*args, check=False, env=env), contains)


def evict(fpaths):
    "Write back and drop these files' pages from the page cache (fsync, then fadvise DONTNEED): the rest stays cached."
    for fp in fpaths:
        fd = os.open(fp, os.O_RDONLY)
        try: os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally: os.close(fd)


def fake_inference(tmp):
    """Shard metadata of the tiny generated data set and an inference folder of random sparse activations (32 latents)
    for one run, as `saev_nb inference` writes them: returns (run, shards, token_acts.npz)."""
    import scipy.sparse as sp, torch
    from saev_nb.data import tiny_dataset
    from saev_nb.metrics import Metrics
    from saev_nb.evaluate import save_inference
    from saev_nb.models import DEFAULT_CKPT, DEFAULT_FAMILY, load_vit
    from saev_nb.shards import Metadata
    root = tiny_dataset()
    vit = load_vit(DEFAULT_FAMILY, DEFAULT_CKPT)
    n_ex, p = 64, vit.n_patches
    md = Metadata(family=DEFAULT_FAMILY, ckpt=DEFAULT_CKPT, layers=(2,), content_tokens_per_example=p, cls_token=True,
                  d_model=vit.d_model, n_examples=n_ex, max_tokens_per_shard=n_ex * (p + 1),
                  data={'kind': 'SegFolderConfig', 'root': str(root), 'split': 'training'}, dataset=str(root))
    shards = tmp / 'shards' / md.hash
    shards.mkdir(parents=True); md.dump(shards)
    run = tmp / 'runs' / 'r0'; run.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    f = torch.relu(torch.randn(n_ex * p, 32, generator=g) - 2.0)
    m = Metrics(8, 32).update(torch.randn(n_ex * p, 8, generator=g), torch.zeros(n_ex * p, 8), f)
    out = run / 'inference' / md.hash / 'layer2-content'
    save_inference(out, m, sp.csr_matrix(f.numpy()),
                   dict(run=str(run), shards=str(shards), layer=2, tokens='content', tokens_per_example=p,
                        has_cls=False, key='layer2-content'))
    return run, shards, out / 'token_acts.npz'

def data_sae_run(t: dict, d_sae: int, fire_quantile: float | None = None, layer: int = 2):
    """A ReLU SAE initialised from the training tokens of `tiny_shards` output `t` at `layer` (seeded), saved as a run
    (`<dpath>/runs/r0` with the config.json that names its shards); `fire_quantile` lowers each latent's bias so it
    fires on that top share of patches. Returns (run folder, SAE, the tokens)."""
    import json, torch
    from saev_nb.loaders import IndexedDataset
    from saev_nb.sae import SAE, SAEConfig, Relu, save_sae
    ds = IndexedDataset(t['train'], layer, 'content')
    x = ds[torch.arange(len(ds))]['acts']
    sae = SAE(SAEConfig(d_model=x.shape[1], d_sae=d_sae, activation=Relu()), seed=0)
    sae.init_b_dec(x); sae.init_from_data(x, 0.9, seed=0)
    if fire_quantile is not None:
        with torch.no_grad(): sae.b_enc -= sae.pre_acts(x).quantile(fire_quantile, dim=0)
    run = t['dpath']/'runs'/'r0'
    save_sae(sae, run/'sae.safetensors')
    (run/'config.json').write_text(json.dumps({'train_data': {'shards': str(t['train']), 'layer': layer}}))
    return run, sae, x
