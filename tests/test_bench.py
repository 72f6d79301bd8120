"""saev_nb.bench: the three harnesses on tiny sizes (fields, ratios consistent with their rates), their console
commands, the one-line error of `--cold` without the right to drop the page cache, and the GPU check's dry run on
the CPU (`tools/gpu-check.sh --cpu`): every check in its JSON report has a goal, a measured value and a verdict."""
import dataclasses, json, subprocess
from pathlib import Path

import pytest

from saev_nb.bench import (BenchError, BenchLoaderConfig, BenchTrainConfig, bench_loader, bench_train, drop_page_cache)
from helpers import cli

ROOT = Path(__file__).resolve().parents[1]


def test_bench_loader_small():
    r = bench_loader(BenchLoaderConfig(size_gb=0.01, shard_gb=0.004, d_model=32, content_tokens=32, batch_size=512,
                                       block_tokens=4, n_repeats=1))
    assert r['n_tokens'] > 0 and r['shuffled_gbs'] > 0 and r['memcpy_gbs'] > 0 and 0.8 < r['entropy_ratio'] <= 1.05
    assert r['memcpy_fresh_gbs'] > 0 and r['shuffled_ratio_fresh'] == pytest.approx(r['shuffled_gbs'] / r['memcpy_fresh_gbs'])
    assert r['shuffled_ratio_h2d'] == pytest.approx(r['rates']['shuffled'][0] / r['rates']['h2d'][0])
    assert r['goal_met'] == (r['shuffled_ratio'] >= 0.5)


def test_cli_bench_loader(tmp_path):
    out = cli('bench', 'loader', '--size-gb', '0.01', '--shard-gb', '0.004', '--d-model', '32', '--content-tokens', '32',
              '--batch-size', '512', '--n-repeats', '1', '--dpath', tmp_path / 'b', '--json-fpath', tmp_path / 'r.json')
    for row in ('shuffled loader', 'memcpy (same bytes)', 'memcpy, fresh dest.', 'device copy', 'goal >= 0.5'): assert row in out.stdout
    assert out.stdout.strip().splitlines()[-1] == str((tmp_path / 'b').resolve())
    r = json.loads((tmp_path / 'r.json').read_text())
    assert r['device'] == 'cpu' and r['shuffled_gbs'] > 0


def test_bench_loader_cold_rounds(monkeypatch):
    "The cold comparison's bookkeeping, with the page-cache drop stubbed out (dropping it needs root and slows others)."
    import saev_nb.bench as bench
    drops = []
    monkeypatch.setattr(bench, 'drop_page_cache', lambda: drops.append(1))
    r = bench_loader(BenchLoaderConfig(size_gb=0.01, shard_gb=0.004, d_model=32, content_tokens=32, batch_size=512,
                                       block_tokens=4, n_repeats=2, cold=True))
    assert len(drops) == 1 + 2 * 2  # once up front, then before each of the two epochs of each round
    assert r['cold'] and len(r['rates']['ordered']) == len(r['rates']['shuffled']) == 2
    ratios = [s / o for s, o in zip(r['rates']['shuffled'], r['rates']['ordered'])]
    assert r['cold_ratio'] == pytest.approx(sorted(ratios)[0] / 2 + sorted(ratios)[1] / 2)
    assert 0.8 < r['entropy_ratio'] <= 1.05 and r['cold_ordered_gbs'] > 0
    for k in ('ordered', 'shuffled'):  # memory, faults and reads of each loader's epochs
        assert len(r['watch'][k]) == 2 and r[f'cold_{k}_rss_anon_gb'] >= r['rss_anon_start_gb'] > 0
        assert r[f'cold_{k}_rss_anon_gb'] == max(w['rss_anon_peak_gb'] for w in r['watch'][k])
        assert r[f'cold_{k}_major_faults'] >= 0 and r[f'cold_{k}_read_gb'] >= 0 and r[f'cold_{k}_rss_file_gb'] > 0
    assert r['mem_total_gb'] >= r['mem_available_min_gb'] > 0 and r['swap_total_gb'] >= r['swap_used_peak_gb'] >= 0
    assert r['data_reused'] is False and r['write_s'] > 0 and r['shuffled_release'] in (True, False, None)
    rows = dict((name, note) for name, _, note in bench._loader_table(BenchLoaderConfig(), r))
    assert 'swap:' in rows['major faults, swap'] and 'RssFile' in rows['peak RssAnon']


def test_bench_loader_reuses_data(tmp_path, monkeypatch):
    "A second cold run on the same `dpath` reads the shards the first one wrote (same settings) instead of rewriting."
    import saev_nb.bench as bench
    monkeypatch.setattr(bench, 'drop_page_cache', lambda: None)
    cfg = BenchLoaderConfig(dpath=tmp_path, size_gb=0.01, shard_gb=0.004, d_model=32, content_tokens=32,
                            batch_size=512, block_tokens=4, n_repeats=1, cold=True)
    a = bench_loader(cfg)
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.rglob('acts*.bin')}
    b = bench_loader(cfg)
    assert not a['data_reused'] and b['data_reused'] and b['write_s'] is None and b['n_tokens'] == a['n_tokens']
    assert stamp and {p: p.stat().st_mtime_ns for p in tmp_path.rglob('acts*.bin')} == stamp
    c = bench_loader(dataclasses.replace(cfg, seed=1))  # other settings: new shards beside the old
    assert not c['data_reused'] and len(list(tmp_path.glob('*/metadata.json'))) == 2


def test_resource_watch_sees_fresh_memory():
    import numpy as np
    from saev_nb.bench import ResourceWatch
    with ResourceWatch(ROOT) as w: held = np.ones(2 ** 26)  # 0.54 GB
    assert w.result['rss_anon_peak_gb'] - w.result['rss_anon_start_gb'] > 0.4 and held.sum() == 2 ** 26
    assert w.result['swap_used_peak_gb'] <= w.result['swap_total_gb'] and w.result['device_reads'] >= 0


def test_drop_page_cache_without_right_is_one_line(tmp_path):
    with pytest.raises(BenchError, match='--cold needs root'): drop_page_cache(tmp_path / 'no' / 'drop_caches')


def test_bench_train_small():
    res = bench_train(BenchTrainConfig(d_model=32, exp_factor=4, batch_size=256, n_steps=1, n_saes=2))
    assert res['tokens_per_s'] > 0 and 0 < res['fraction_of_matmul'] and res['loop_per_sae_cost'] > 0


def test_bench_train_parts(tmp_path):
    "Overhead line, matmul share and the end-to-end run through the shuffled loader, at toy sizes."
    r = bench_train(BenchTrainConfig(d_model=32, exp_factor=2, batch_size=256, n_steps=1, n_saes=2, bmm=False,
                                     n_overhead_steps=10, e2e_gb=0.003, e2e_tokens=5000))
    assert r['overhead_step_1_us'] > 0 and r['overhead_per_sae_us'] == pytest.approx(
        (r['overhead_step_n_us'] - r['overhead_step_1_us']) / (r['overhead_n_saes'] - 1))
    assert 0 < r['matmul_share'] < 1 and r['non_matmul_fraction'] == pytest.approx(1 - r['matmul_share'])
    assert r['e2e_tokens'] >= 5000 and r['e2e_tokens_per_s'] > 0 and r['ceiling_tokens_per_s'] > 0


def test_cli_bench_train_and_shards(tmp_path):
    cli('bench', 'train', '--d-model', '16', '--exp-factor', '2', '--batch-size', '64', '--n-steps', '1', '--n-saes', '2',
        '--no-bmm', '--no-profile', '--n-overhead-steps', '5', '--json-fpath', tmp_path / 't.json')
    assert json.loads((tmp_path / 't.json').read_text())['loop_per_sae_cost'] > 0
    out = cli('bench', 'shards', '--n-images', '16', '--batch-size', '16', '--n-workers', '0', '--n-repeats', '1',
              '--json-fpath', tmp_path / 's.json')
    assert 'writer/forward' in out.stdout and json.loads((tmp_path / 's.json').read_text())['ratio'] > 0


def test_cli_bench_loader_cold_without_root_is_one_line():
    import os
    if os.geteuid() == 0: pytest.skip('root may drop the page cache; this checks the one-line refusal')
    from helpers import cli_fails
    cli_fails('bench', 'loader', '--cold', '--size-gb', '0.01', contains='--cold needs root')


def test_cli_bench_bad_sizes_are_one_line(tmp_path):
    "Sizes that make no sense: one line naming every such flag and its range; no data set, shards or JSON written."
    from helpers import cli_fails
    line = cli_fails('bench', 'shards', '--n-images', '0', '--batch-size', '0', '--shards-root', tmp_path / 'sr',
                     '--json-fpath', tmp_path / 's.json', contains='--n-images 0: use a value >= 1')
    assert '--batch-size 0: use a value >= 1' in line
    cli_fails('bench', 'train', '--batch-size', '0', '--n-steps', '0', '--no-overhead',
              '--json-fpath', tmp_path / 't.json', contains='--batch-size 0: use a value >= 1; --n-steps 0: use a value >= 1')
    cli_fails('bench', 'loader', '--size-gb', '0', '--dpath', tmp_path / 'b', contains='--size-gb 0.0: use a value > 0')
    assert sorted(tmp_path.iterdir()) == []  # no shard root, loader data or result file


@pytest.mark.skipif(__import__('torch').cuda.is_available(), reason='checks the refusal on a machine without a GPU')
def test_cli_bench_device_cuda_without_gpu_is_one_line(tmp_path):
    from helpers import cli_fails
    for cmd in ('train', 'shards'):
        cli_fails('bench', cmd, '--device', 'cuda', '--json-fpath', tmp_path / f'{cmd}.json',
                  contains='--device cuda: torch sees no CUDA GPU on this machine; use --device cpu')
    assert sorted(tmp_path.iterdir()) == []


def test_gpu_check_dry_run(tmp_path):
    "`tools/gpu-check.sh --cpu` runs every check and its JSON report has a goal, a value and a verdict for each."
    from saev_nb.bench import GPU_CHECKS
    r = subprocess.run(['bash', str(ROOT / 'tools' / 'gpu-check.sh'), '--cpu', str(tmp_path)], capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((tmp_path / 'report.json').read_text())
    assert rep['mode'] == 'cpu' and rep['all_ran'] and rep['nproc'] >= 1
    assert [c['check'] for c in rep['checks']] == [c[0] for c in GPU_CHECKS]
    for c in rep['checks']:
        assert c['value'] is not None and c['rc'] == 0, c
        assert (c['pass'] is None) == (c['goal'] is None) and c['log'] and (tmp_path / c['log']).exists()
    md = (tmp_path / 'report.md').read_text()
    assert all(f"`{c[0]}`" in md for c in GPU_CHECKS)
    assert json.loads((tmp_path / 'raw' / 'determinism.json').read_text())['resume_max_abs_diff'] == 0.0


def test_bench_loader_cold_under_read_cap(monkeypatch, tmp_path):
    "As root: `read_mbps` holds both first epochs under the cap and leaves no cgroup behind (only the shards evicted)."
    import os
    from saev_nb import bench
    if os.geteuid() != 0 or not bench.BLKIO_DPATH.is_dir(): pytest.skip('capping reads needs root and cgroup v1 blkio')
    from helpers import evict
    # the page cache of these shards only: the suite's other files stay cached
    monkeypatch.setattr(bench, 'drop_page_cache', lambda: evict((tmp_path / 'b').rglob('*.bin')))
    r = bench_loader(BenchLoaderConfig(size_gb=0.03, shard_gb=0.01, d_model=32, content_tokens=32, batch_size=512,
                                       n_repeats=1, cold=True, read_mbps=10, dpath=tmp_path / 'b'))
    assert r['read_mbps'] == 10 and r['cold_shuffled_read_gb'] > 0.02  # it did read from the disk
    assert 0.004 < r['cold_ordered_gbs'] < 0.0125 and 0.004 < r['cold_shuffled_gbs'] < 0.0125
    assert 'reads capped at 10 MB/s' in bench._loader_table(BenchLoaderConfig(cold=True), r)[0][2]
    assert not [p for p in bench.BLKIO_DPATH.iterdir() if p.name.startswith('saev_nb-bench-')]


def test_cli_bench_read_caps_need_cold(tmp_path):
    "`--read-mbps` without `--cold` (nothing would be read from storage) and a cap of 0: one line each, nothing written."
    from helpers import cli_fails
    cli_fails('bench', 'loader', '--read-mbps', '100', '--size-gb', '0.01', '--dpath', tmp_path / 'b',
              contains='add --cold, or drop them')
    cli_fails('bench', 'loader', '--cold', '--read-iops', '0', '--dpath', tmp_path / 'b', contains='--read-iops 0: use a value >= 1')
    assert sorted(tmp_path.iterdir()) == []


def test_bench_train_in_chunks():
    "`chunk_tokens` reaches the trainers: the step runs in passes of 24 of the 64 tokens, and the result says so."
    r = bench_train(BenchTrainConfig(d_model=16, exp_factor=2, batch_size=64, n_steps=1, n_saes=2, chunk_tokens=24,
                                     bmm=False, overhead=False))
    assert r['chunk_tokens'] == 24 and r['tokens_per_s'] > 0 and 0 < r['non_matmul_fraction'] < 1


def test_cli_bench_gpu_check_steps(tmp_path):
    "The GPU check's own steps as commands: `saev_nb bench determinism`, `cells` and `report`, one typed config each."
    raw = tmp_path / 'raw'
    cli('bench', 'determinism', '--d-model', '8', '--batch-size', '32', '--n-steps', '8', '--ckpt-every', '4',
        '--interrupt-after', '6', '--json-fpath', raw / 'determinism.json')
    det = json.loads((raw / 'determinism.json').read_text())
    assert det['same_seed_max_abs_diff'] == 0.0 and det['resume_max_abs_diff'] == 0.0 and det['resumed_from_batch'] == 4
    cli('bench', 'cells', '--root', ROOT, '--no-run', '--json-fpath', raw / 'cells.json')
    cells = json.loads((raw / 'cells.json').read_text())
    assert cells['mode'] == 'compile' and cells['n_failed'] == 0 and cells['notebooks']
    for name in ('determinism', 'cells'): (raw / f'{name}.status.json').write_text(json.dumps({'rc': 0, 'seconds': 1.0}))
    out = cli('bench', 'report', '--out', tmp_path, '--mode', 'cpu').stdout
    assert '| `determinism_resume` | 0 | <= 1e-05 | pass |' in out and '| `gpu_cells` | 0 | == 0 | pass |' in out
    rep = json.loads((tmp_path / 'report.json').read_text())
    assert rep['mode'] == 'cpu' and not rep['all_ran']  # the loader, train, shards and paper checks did not run


def test_bench_module_has_no_dispatcher_of_its_own():
    "The GPU check's steps are `saev_nb bench ...` commands: `saev_nb.bench` has no `__main__` dispatcher beside `cli`."
    import saev_nb.bench as bench
    assert not hasattr(bench, 'bench_tools_main') and not hasattr(bench, 'BENCH_TOOLS')
    for fn in (bench.bench_determinism_cli, bench.bench_cells_cli, bench.bench_report_cli):
        assert list(__import__('typing').get_type_hints(fn)) == ['cfg']
