"Integration, CLI and failure tests for saev_nb.train: sweeps, grouping, synthetic recovery, exact resume, runs on shards."
import json, subprocess, sys
from dataclasses import replace
from pathlib import Path
import pytest, torch
from saev_nb.sae import SAEConfig, Relu, TopK, BatchTopK, Vanilla, Matryoshka
from saev_nb.loaders import ShuffledConfig
from saev_nb.jobs import SlurmConfig
from saev_nb.runs import TrainConfig, load_run, load_run_config, run_id
from saev_nb.sweeps import expand_cfgs, fit_batch_sizes, split_groups
from saev_nb.train import (ArrayLoader, SAETrainer, atom_recovery, evaluate_saes, fit_group, sparse_dictionary_data,
                           train)
from helpers import cli_fails, cli_in_process, cli_in_process_fails

def _base(tmp_path, **kw):
    d = ShuffledConfig(shards=tmp_path, layer=0, batch_size=256)
    return TrainConfig(train_data=d, val_data=d, runs_root=tmp_path/'runs', log_every=50, ckpt_every='off', **kw)

def test_synthetic_recovery_all_variants(tmp_path):
    x, atoms = sparse_dictionary_data(8192, seed=0)
    combos = [(Relu(), Vanilla(sparsity_coeff=1e-2), 1e-2, 0.8), (TopK(top_k=4), Vanilla(), 3e-3, 0.0),
              (BatchTopK(top_k=4), Matryoshka(n_prefixes=4), 3e-3, 0.0), (TopK(top_k=4), Matryoshka(n_prefixes=4), 3e-3, 0.0)]
    cfgs = [replace(_base(tmp_path), sae=SAEConfig(d_model=32, d_sae=128, activation=a), objective=o, lr=lr, datapoint_init=dp,
                    n_lr_warmup=50, n_train=256 * 600) for a, o, lr, dp in combos]
    trs = fit_group(cfgs, ArrayLoader(x, 256, seed=1), [tmp_path/str(i) for i in range(4)], progress=False)
    ev = evaluate_saes([t.sae for t in trs], ArrayLoader(sparse_dictionary_data(4096, seed=0)[0], 512, shuffle=False), 4096)
    assert all(e['nmse'] < 0.25 for e in ev), ev
    assert all(float(atom_recovery(t.sae, atoms).mean()) > 0.8 for t in trs)
    assert float(atom_recovery(trs[1].sae, atoms).mean()) > 0.95

def test_resume_with_uneven_checkpoints(tmp_path):
    "One SAE's checkpoint is a step behind the other's (killed between writes): both still match the uninterrupted run."
    x, _ = sparse_dictionary_data(2048, seed=0)
    cfgs = [replace(_base(tmp_path), sae=SAEConfig(d_model=32, d_sae=64, activation=a), n_train=256 * 30, ckpt_every=5, n_init_tokens=512,
                    objective=Matryoshka(n_prefixes=3), lr=3e-3) for a in (Relu(), BatchTopK(top_k=4))]
    ref = fit_group(cfgs, ArrayLoader(x, 256), [tmp_path/'a0', tmp_path/'a1'], progress=False)
    class Kill:
        def __init__(s, at): s.at = at
        def iter_batches(s, n, start_batch=0):
            for b, batch in enumerate(ArrayLoader(x, 256).iter_batches(n, start_batch), start_batch):
                if b == s.at: raise RuntimeError('killed')
                yield batch
    dp = [tmp_path/'b0', tmp_path/'b1']
    with pytest.raises(RuntimeError): fit_group(cfgs, Kill(12), dp, progress=False)  # both at step 10
    import shutil; shutil.copy(dp[0]/'checkpoint.pt', tmp_path/'old.pt')
    with pytest.raises(RuntimeError): fit_group(cfgs, Kill(17), dp, progress=False)  # both at step 15
    shutil.copy(tmp_path/'old.pt', dp[0]/'checkpoint.pt')  # SAE 0 falls back to step 10
    res = fit_group(cfgs, ArrayLoader(x, 256), dp, progress=False)
    for a, b in zip(ref, res):
        for k, v in a.sae.state_dict().items(): assert torch.equal(b.sae.state_dict()[k], v), k
    for i in range(2): assert (dp[i]/'metrics.jsonl').read_text() == (tmp_path/f'a{i}'/'metrics.jsonl').read_text()

def test_sweep_errors_and_grouping(tmp_path):
    f = tmp_path/'s.toml'
    base = replace(_base(tmp_path), sweep=f)
    for text, msg in [('[sae]\nactivation = 3', 'sae.activation: expected a table'), ('[sae.activation]\nkind = "gelu"', "unknown 'gelu'"),
                      ('max_parallel = 2', 'not allowed'), ('lr = []', 'empty list'), ('tags = ["a", 1]', 'tags[1]: expected str'),
                      ('[objective]\nkind = "matryoshka"\nn_prefixes = true', 'objective.n_prefixes: expected int')]:
        f.write_text(text)
        with pytest.raises(ValueError, match=msg.replace('[', r'\[').replace('(', r'\(')): expand_cfgs(base)
    f.write_text('lr = [1e-3, 3e-3]\nseed = [1, 2]\n[train_data]\nseed = [5, 6]\n[sae]\nd_sae = [64, 128]\n')
    cfgs = expand_cfgs(base)
    assert len(cfgs) == 16 and len(set(map(run_id, cfgs))) == 16
    assert [len(g) for g in split_groups(cfgs)] == [8, 8]
    assert [len(g) for g in split_groups(cfgs, 5)] == [5, 3, 5, 3]
    with pytest.raises(FileNotFoundError): expand_cfgs(replace(base, sweep=tmp_path/'nope.toml'))

def _shards(tmp_path):
    from saev_nb.shards import make_random_shards
    return make_random_shards(tmp_path/'shards', n_examples=64, layers=(0, 1), d_model=32, content_tokens=16)

def _cli(*args):
    return subprocess.run([sys.executable, '-m', 'saev_nb.cli', *map(str, args)], capture_output=True, text=True, timeout=300)

def test_cli_seed_command_and_rerun(tmp_path):
    sh = _shards(tmp_path)
    args = ['train', '--runs-root', tmp_path/'runs', '--train-data.shards', sh, '--train-data.layer', 1, '--train-data.batch-size', 128,
            '--val-data.shards', sh, '--val-data.layer', 1, '--val-data.batch-size', 256, '--sae.d-model', 32, '--sae.exp-factor', 4,
            '--lr', '4e-3', '--n-train', '10_000', '--n-val', 1024, '--ckpt-every', 20, 'sae.activation:relu', 'objective:matryoshka',
            '--objective.sparsity-coeff', '1e-3']
    r = _cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    run = Path(r.stdout.strip().splitlines()[-1])
    ev = json.loads((run/'eval.json').read_text())
    assert ev['n_tokens'] == 1024 and 0 <= ev['nmse'] < 2 and set(ev) >= {'l0', 'n_dead', 'n_almost_dead', 'n_dense'}
    assert json.loads((run/'config.json').read_text())['objective']['sparsity_coeff'] == 1e-3
    mtime = (run/'sae.safetensors').stat().st_mtime
    r2 = cli_in_process(*args)  # same command (in-process: the same `main`): finished runs are skipped
    assert r2.stdout.strip().splitlines()[-1] == str(run) and (run/'sae.safetensors').stat().st_mtime == mtime
    with pytest.raises(SystemExit) as bad: cli_in_process(*args[:-1], 'lots')  # tyro rejects the value and exits
    assert bad.value.code != 0

def test_cli_bad_d_model(tmp_path):
    sh = _shards(tmp_path)
    cli_in_process_fails('train', '--runs-root', tmp_path/'runs', '--train-data.shards', sh, '--train-data.batch-size', 128,
                         '--val-data.shards', sh, '--sae.d-model', 768, '--n-train', 1000, contains='d_model=32')

def test_cli_layer_and_token_set_problems(tmp_path):
    "The shards' metadata resolves the layer and the token set (`Metadata.layer_problem`, `token_span`): one line each."
    from helpers import cli_fails
    from saev_nb.shards import make_random_shards
    sh = _shards(tmp_path)
    nocls = make_random_shards(tmp_path/'nocls', n_examples=64, layers=(0, 1), d_model=32, content_tokens=16, cls_token=False)
    base = ['train', '--runs-root', tmp_path/'runs', '--train-data.batch-size', 128, '--val-data.batch-size', 128,
            '--sae.d-model', 32, '--n-train', 1000]
    line = cli_fails(*base, '--train-data.shards', sh, '--val-data.shards', sh, '--train-data.layer', 5, '--val-data.layer', 5,
                     contains=f'{sh}/metadata.json: layer 5 was not recorded (layers: [0, 1]); pass one of those as --train-data.layer')
    assert 'pass one of those as --val-data.layer' in line  # every problem, in one line
    cli_in_process_fails(*base, '--train-data.shards', nocls, '--val-data.shards', nocls, '--train-data.tokens', 'cls',
                         '--val-data.tokens', 'cls', contains=f"{nocls}/metadata.json: cls_token is false, so tokens='cls' has nothing to read")

def test_submitit_local_executor(tmp_path):
    sh = _shards(tmp_path)
    d = ShuffledConfig(shards=sh, layer=0, batch_size=128)
    cfg = TrainConfig(train_data=d, val_data=replace(d, batch_size=512), sae=SAEConfig(d_model=32, exp_factor=2), n_train=2000, n_val=512,
                      runs_root=tmp_path/'runs', executor='local', slurm=SlurmConfig(log_to=tmp_path/'logs'))
    (run,) = train(cfg, progress=False)
    assert (run/'eval.json').exists()

def test_eval_json_agrees_with_inference_metrics(tmp_path):
    """The trainer's eval.json and `saev_nb inference`'s metrics.json come from one `Metrics`: on the same tokens (every
    validation token, once) with the same normalizer they agree, though the trainer reads them shuffled."""
    from helpers import cli
    from saev_nb.shards import make_random_shards
    tr_sh = _shards(tmp_path)
    val_sh = make_random_shards(tmp_path/'val', n_examples=48, layers=(0, 1), d_model=32, content_tokens=16, seed=5)
    r = cli('train', '--runs-root', tmp_path/'runs', '--train-data.shards', tr_sh, '--train-data.layer', 1,
            '--train-data.batch-size', 128, '--train-data.scale-mean', '--train-data.scale-norm',
            '--val-data.shards', val_sh, '--val-data.layer', 1, '--val-data.batch-size', 256,
            '--sae.d-model', 32, '--sae.exp-factor', 4, '--lr', '4e-3', '--n-train', 4096, '--n-val', 10**6,
            'sae.activation:topk', '--sae.activation.top-k', 4)
    run = Path(r.stdout.strip().splitlines()[-1])
    assert (run/'normalizer.safetensors').is_file()
    ev = json.loads((run/'eval.json').read_text())
    out = Path(cli_in_process('inference', '--run', run, '--data.shards', val_sh, '--data.batch-size', 256).stdout.strip().splitlines()[-1])
    assert out.parent.parent == run/'inference' and out.name == 'layer1-content'
    m = json.loads((out/'metrics.json').read_text())
    assert ev['n_tokens'] == m['n_tokens'] == 48 * 16  # --n-val is capped at one epoch: every validation token once
    assert json.loads((out/'config.json').read_text())['normalized']
    assert ev['nmse'] == pytest.approx(m['normalized_mse'], rel=1e-9) and 0 < ev['nmse'] < 2
    assert ev['mse'] == pytest.approx(m['mse_per_dim'], rel=1e-9)
    assert ev['l0'] == pytest.approx(m['l0'], rel=1e-9) and ev['l1'] == pytest.approx(m['l1'], rel=1e-9)
    counts = ('n_dead', 'n_almost_dead', 'n_dense', 'd_sae')
    assert [ev[k] for k in counts] == [m[k] for k in counts]

def test_compile_matches_eager(tmp_path):
    "`compile=True` trains the same SAEs as eager (ReLU+L1 vanilla, and Matryoshka whose prefixes change every step)."
    import time
    x = sparse_dictionary_data(n=64 * 6, d=8, n_atoms=16, seed=0)[0]
    t0 = time.perf_counter()
    for obj in (Vanilla(sparsity_coeff=1e-2), Matryoshka(n_prefixes=3)):
        cfg = replace(_base(tmp_path, sae=SAEConfig(d_model=8, exp_factor=2), objective=obj, lr=1e-2, n_lr_warmup=2,
                            n_sparsity_warmup=3), n_train=64 * 6)
        eager, comp = SAETrainer(cfg, 6), SAETrainer(replace(cfg, compile=True), 6)
        for b, x_bd in enumerate(x.split(64)):
            st_e, st_c = eager.step(x_bd, b), comp.step(x_bd, b)
            assert abs(float(st_e['loss']) - float(st_c['loss'])) <= 1e-5 * float(st_e['loss'])
            assert torch.equal(st_e['fired_s'], st_c['fired_s'])
        for k, p in eager.sae.state_dict().items():
            assert torch.allclose(p, comp.sae.state_dict()[k], rtol=0, atol=1e-5), k
    assert run_id(cfg) == run_id(replace(cfg, compile=True))  # how a step runs is not part of what is trained
    print(f'compile test: {time.perf_counter() - t0:.1f} s')

def test_chunked_steps_train_the_same_run(tmp_path):
    "A group trained in passes of 100 tokens (batches of 256: 100, 100, 56) logs the rows and weights of whole-batch steps."
    x, _ = sparse_dictionary_data(2048, seed=0)
    cfgs = [replace(_base(tmp_path), sae=SAEConfig(d_model=32, d_sae=64, activation=a), objective=o, n_train=256 * 20,
                    log_every=5, lr=3e-3, n_lr_warmup=2, n_init_tokens=512) for a, o in ((Relu(), Matryoshka(n_prefixes=3)),
                                                                                     (TopK(top_k=4), Vanilla()))]
    whole = fit_group(cfgs, ArrayLoader(x, 256), [tmp_path/'w0', tmp_path/'w1'], progress=False)
    parts = fit_group([replace(c, chunk_tokens=100) for c in cfgs], ArrayLoader(x, 256), [tmp_path/'c0', tmp_path/'c1'],
                      progress=False)
    for i, (w, c) in enumerate(zip(whole, parts)):
        torch.testing.assert_close(c.sae.W_dec, w.sae.W_dec, atol=1e-5, rtol=0)
        assert torch.equal(c.since_fired_s, w.since_fired_s)
        rows_w, rows_c = ([json.loads(l) for l in (tmp_path/f'{k}{i}'/'metrics.jsonl').read_text().splitlines()] for k in 'wc')
        assert len(rows_c) == len(rows_w) == 4
        for rw, rc in zip(rows_w, rows_c):
            for k in ('loss', 'mse', 'l0', 'nmse', 'grad_norm'): assert rc[k] == pytest.approx(rw[k], rel=1e-4, abs=1e-6), k

def test_chunk_tokens_bad_values_are_one_line(tmp_path):
    "`--chunk-tokens` through the console script: 0 is refused, and so is chunking BatchTopK; nothing is written."
    args = ['train', '--runs-root', tmp_path/'runs', '--train-data.shards', tmp_path, '--val-data.shards', tmp_path,
            '--train-data.batch-size', 64, '--n-train', 640]
    cli_fails(*args, '--chunk-tokens', 0, contains='--chunk-tokens 0: use >= 1 tokens per pass')
    cli_in_process_fails(*args, '--chunk-tokens', 16, 'sae.activation:batchtopk', contains='BatchTopK would pick top-k per chunk')
    assert not (tmp_path/'runs').exists()


# ---------------------------------------------------------------- issue 22: first-hour rough edges (installed CLI)
def _warnings(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if l.startswith('warning: ')]

def test_default_batch_sizes_are_capped_with_one_warning_each(tmp_path):
    "No batch-size flags on small shards: each data config's batch size is capped to the tokens recorded, said once."
    from helpers import cli
    sh = _shards(tmp_path)  # 64 examples x 16 content tokens = 1,024 tokens, far below the default 16,384
    (tmp_path/'two.toml').write_text('seed = [1, 2]\n')
    r = cli('train', '--runs-root', tmp_path/'runs', '--train-data.shards', sh, '--train-data.layer', 1, '--val-data.shards', sh,
            '--val-data.layer', 1, '--sae.d-model', 32, '--sae.exp-factor', 2, '--n-train', 2048, '--n-val', 1024, '--n-lr-warmup', 1,
            '--sweep', tmp_path/'two.toml', env={'TQDM_DISABLE': '1'})
    ws = _warnings(r.stderr)
    for flag in ('--train-data.batch-size', '--val-data.batch-size'):
        assert [w for w in ws if w.startswith(f'warning: {flag} ')] == [
            f'warning: {flag} 16384 is more than the 1024 content tokens recorded in {sh}; using {flag} 1024'], r.stderr
    runs = sorted(p for p in (tmp_path/'runs').iterdir() if p.is_dir())
    assert len(runs) == 2 and all((p/'eval.json').exists() for p in runs)
    cfgs = [json.loads((p/'config.json').read_text()) for p in runs]
    assert {(c['train_data']['batch_size'], c['val_data']['batch_size']) for c in cfgs} == {(1024, 1024)}  # what it trained with
    # the capped run is the run that the explicit batch size names (the run id means what was trained)
    c = load_run_config(runs[0])
    big = replace(c, sweep=None, train_data=replace(c.train_data, batch_size=16384), val_data=replace(c.val_data, batch_size=16384))
    with pytest.warns(UserWarning, match='using --train-data.batch-size 1024'): capped = fit_batch_sizes(big)
    assert run_id(capped) == runs[0].name

def test_sweep_file_overrides_are_named_once(tmp_path):
    "Flags the sweep file replaces are named in one warning line, also a flag given at its default (`--sae.exp-factor 16`)."
    from helpers import cli
    sh = _shards(tmp_path)
    (tmp_path/'guide.toml').write_text('[sae]\nsparsity_coeff = [1e-4, 2e-4]\nd_sae = [32, 64]\n[data]\nscale_mean = true\n')
    args = ['train', '--runs-root', tmp_path/'runs', '--train-data.shards', sh, '--train-data.layer', 1, '--val-data.shards', sh,
            '--val-data.layer', 1, '--train-data.batch-size', 256, '--val-data.batch-size', 256, '--sae.d-model', 32,
            '--n-train', 512, '--n-val', 256, '--n-lr-warmup', 1, '--sae.exp-factor', 16, 'sae.activation:relu', 'objective:matryoshka',
            '--objective.sparsity-coeff', '1e-3', '--sweep', tmp_path/'guide.toml']
    r = cli(*args, env={'TQDM_DISABLE': '1'})
    ws = [w for w in _warnings(r.stderr) if ' overrides --' in w]
    assert ws == [f'warning: {tmp_path/"guide.toml"} overrides --objective.sparsity-coeff 0.001, --sae.exp-factor 16 given on the '
                  "command line; the sweep file's values are used (drop them from the file to keep the flags)"], r.stderr
    assert len(r.stdout.strip().splitlines()) == 5  # four runs and the runs root
    # without conflicting flags: no such warning
    quiet = [a for a in args if a not in ('--sae.exp-factor', 16, '--objective.sparsity-coeff', '1e-3')]
    r = cli_in_process(*quiet, env={'TQDM_DISABLE': '1'})
    assert not [w for w in _warnings(r.stderr) if ' overrides --' in w], r.stderr

def test_nmse_above_one_is_a_warning_naming_the_run(tmp_path):
    "A run that reconstructs worse than the mean (an untrained random SAE: lr 1e-9, no b_dec init) is named on stderr."
    from helpers import cli
    sh = _shards(tmp_path)
    r = cli('train', '--runs-root', tmp_path/'runs', '--train-data.shards', sh, '--train-data.layer', 1, '--val-data.shards', sh,
            '--val-data.layer', 1, '--train-data.batch-size', 256, '--val-data.batch-size', 256, '--sae.d-model', 32,
            '--sae.exp-factor', 2, '--n-train', 512, '--n-val', 256, '--n-lr-warmup', 1, '--lr', '1e-9', '--no-init-b-dec',
            env={'TQDM_DISABLE': '1'})
    run = Path(r.stdout.strip().splitlines()[-1])
    nmse = json.loads((run/'eval.json').read_text())['nmse']
    assert nmse > 1
    assert [w for w in _warnings(r.stderr) if 'NMSE' in w] == [
        f'warning: run {run}: NMSE {nmse:.3g} > 1, worse than predicting the mean activation; lower --lr or '
        '--objective.sparsity-coeff, or train longer (--n-train)']

def test_run_codes_of_an_image_match_the_shards(tmp_path):
    "From a PIL image to SAE codes with the ViT the run records (train_metadata.json), as the shards recorded it."
    from helpers import cli, tiny_shards
    from PIL import Image
    from saev_nb.loaders import IndexedDataset
    from saev_nb.shards import Metadata
    d = tiny_shards(tmp_path)
    md = Metadata.load(d['train'])
    r = cli('train', '--runs-root', tmp_path/'runs', '--train-data.shards', d['train'], '--train-data.layer', 3,
            '--val-data.shards', d['val'], '--val-data.layer', 3, '--sae.d-model', md.d_model, '--sae.exp-factor', 2,
            '--train-data.scale-mean', '--val-data.scale-mean', '--n-train', 4 * 48 * md.content_tokens_per_example,
            '--n-val', 1024, '--n-lr-warmup', 1, env={'TQDM_DISABLE': '1'})
    run_dpath = Path(r.stdout.strip().splitlines()[-1])
    assert json.loads((run_dpath/'train_metadata.json').read_text())['ckpt'] == md.ckpt
    run = load_run(run_dpath)
    imgs = [Image.open(p) for p in sorted((d['root']/'images'/'training').iterdir())[:2]]
    n = md.content_tokens_per_example
    acts = IndexedDataset(d['train'], 3)[torch.arange(2 * n)]['acts'].reshape(2, n, -1)
    codes = run.codes_of(imgs)
    assert codes.shape == (2, n, run.sae.d_sae) and run.normalizer is not None
    torch.testing.assert_close(run.acts_of(imgs), acts, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(codes, run.encode(acts.flatten(0, 1)).reshape(2, n, -1), atol=1e-4, rtol=1e-4)
    # a run trained before train_metadata.json existed falls back to its training shards' metadata
    (run_dpath/'train_metadata.json').unlink()
    torch.testing.assert_close(load_run(run_dpath).codes_of(imgs[:1]), codes[:1], atol=1e-4, rtol=1e-4)

def test_unset_layer_skip_line_force_and_restart(tmp_path):
    "No --train-data.layer: the last recorded one, the same run id as naming it; a rerun skips with Step's line; "
    "--force (and its alias --restart) trains again."
    sh = _shards(tmp_path)
    base = ['train', '--runs-root', tmp_path/'runs', '--train-data.shards', sh, '--train-data.batch-size', 128,
            '--val-data.shards', sh, '--val-data.batch-size', 256, '--sae.d-model', 32, '--sae.exp-factor', 2,
            '--n-train', 1024, '--n-val', 256, '--n-lr-warmup', 2]
    run = Path(cli_in_process(*base).stdout.strip().splitlines()[-1])
    assert json.loads((run/'config.json').read_text())['train_data']['layer'] == 1  # the last recorded layer
    assert json.loads((run/'config.json').read_text())['val_data']['layer'] == 1  # validation: the training layer
    named = cli_in_process(*base, '--train-data.layer', 1, '--val-data.layer', 1)
    assert named.stdout.strip().splitlines()[-1] == str(run)  # the same run: skipped
    assert f'{run}: already trained (eval.json exists); skipping (--force redoes it)' in named.stderr.splitlines()
    for flag in ('--force', '--restart'):
        mtime = (run/'sae.safetensors').stat().st_mtime_ns
        r = cli_in_process(*base, flag)
        assert 'skipping' not in r.stderr and (run/'sae.safetensors').stat().st_mtime_ns != mtime, flag
        assert r.stdout.strip().splitlines()[-1] == str(run)
    assert json.loads((run/'config.json').read_text())['force'] is True

def test_old_config_json_and_check_shards(tmp_path):
    "A config.json written before `force` and `slurm` (with `restart`, flat Slurm fields) loads with the same run id; "
    "`Run.check_shards` is the one check of an SAE against shards."
    from saev_nb.runs import Run, cfg_to_dict, ShardsMismatchError
    from saev_nb.sae import SAE
    from saev_nb.shards import Metadata
    sh = _shards(tmp_path)
    cfg = _base(tmp_path, sae=SAEConfig(d_model=32, exp_factor=2))
    cfg = replace(cfg, train_data=replace(cfg.train_data, shards=sh, layer=1, tokens='content'))
    old = {k: v for k, v in cfg_to_dict(cfg).items() if k not in ('force', 'slurm')}
    (tmp_path/'old').mkdir(); (tmp_path/'old'/'config.json').write_text(json.dumps(
        {**old, 'restart': False, 'slurm_acct': 'lab', 'slurm_partition': '', 'n_hours': 24.0, 'mem_gb': None,
         'log_to': 'logs', 'wait': False}))
    back = load_run_config(tmp_path/'old')
    assert back.slurm.slurm_acct == 'lab' and back.force is False and run_id(back) == run_id(cfg)
    run, md = Run(tmp_path/'old', SAE(cfg.sae), back, None), Metadata.load(sh)
    assert run.check_shards(md) == (1, 'content') and run.check_shards(md, -1) == (1, 'content')
    with pytest.raises(ShardsMismatchError, match='trained on layer 1, but --acts.layer is 0; pass --acts.layer 1'):
        run.check_shards(md, 0, flag='--acts')
    with pytest.raises(ShardsMismatchError, match='pass --data.tokens content, or --other-tokens'):
        run.check_shards(md, tokens='all', other_tokens=False)
    assert run.check_shards(md, tokens='all', other_tokens=True) == (1, 'all')
    small = Run(tmp_path/'old', SAE(SAEConfig(d_model=16, exp_factor=2)), back, None)
    with pytest.raises(ShardsMismatchError, match='d_model=32 but the SAE in .* expects 16'): small.check_shards(md)
