"""Speed of `saev_nb.probe1d.fit_probes` against saev's own `Sparse1DProbe` on the same inputs (issue 27, "Speed").

Never part of CI: saev lives in its own venv. One driver, three steps, each in the interpreter that owns it:

    .venv/bin/python tools/bench_probe1d_saev.py --sizes 100000:4096:8:32 100000:4096:151:32 \\
        --saev-python /work/saev-interop/venv/bin/python
    .venv/bin/python tools/bench_probe1d_saev.py --no-saev --sizes 20000:1024:151:32   # ours alone

saev's side needs `tdiscovery` in saev's venv: `pip install --no-deps <saev checkout>/contrib/trait_discovery`.
Each side runs one torch thread (--threads) and reports wall and CPU seconds; on a shared machine compare CPU seconds.

  make   (this venv)  planted sparse codes in CSR (float32) and int labels -> WORK/N_D_C_L0.npz
  saev   (saev venv)  tdiscovery.probe1d.Sparse1DProbe(device='cpu', max_iter=30).fit + loss_matrix (its train loss)
  ours   (this venv)  saev_nb.probe1d.fit_probes (Newton to |grad| <= 1e-8; `Probes.n_visited` gives its passes)
  then the driver compares them in this venv: chosen latent per class (argmin train loss), each method's largest
  remaining gradient of the penalized objective evaluated in float64 at its parameters, and the largest |train loss
  difference| over the probes saev converged (its float64 gradient <= --conv-tol).
"""
import argparse, json, math, os, subprocess, sys, time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
LAM = 1e-8


def make(n: int, d: int, n_classes: int, l0: float, seed: int, fpath: Path):
    "Planted SAE-like codes: class c's detector latent c (noisy, not separating), plus skewed random background."
    import scipy.sparse as sp
    rng = np.random.default_rng(seed)
    prev = 1 / np.arange(1, n_classes + 1); prev /= prev.sum()  # Zipf prevalences, like ADE20K's long tail
    y = rng.choice(n_classes, n, p=prev)
    det = (rng.random(n) < 0.7)  # the patch's own detector fires on 70% of its class
    r_det = np.nonzero(det)[0]; c_det = y[r_det]
    false = rng.random(n) < 0.03  # and a random other class's detector fires on 3% of patches
    r_f = np.nonzero(false)[0]; c_f = rng.integers(0, n_classes, len(r_f))
    n_bg = rng.poisson(l0, n); r_bg = np.repeat(np.arange(n), n_bg)
    pop = rng.pareto(1.0, d - n_classes) + 1; pop /= pop.sum()  # a few background latents fire often, most rarely
    c_bg = n_classes + rng.choice(d - n_classes, len(r_bg), p=pop)
    rows = np.concatenate([r_det, r_f, r_bg]); cols = np.concatenate([c_det, c_f, c_bg])
    vals = np.concatenate([rng.gamma(2., 1., len(r_det)) + 0.5, rng.gamma(2., 1., len(r_f)),
                           rng.exponential(1., len(r_bg))]).astype(np.float32)
    x = sp.csr_matrix((vals, (rows, cols)), shape=(n, d), dtype=np.float32); x.sum_duplicates(); x.sort_indices()
    np.savez(fpath, indptr=x.indptr, indices=x.indices, data=x.data, shape=np.array(x.shape), y=y.astype(np.int64),
             n_classes=n_classes)


def load(fpath: Path):
    z = np.load(fpath)
    return z['indptr'], z['indices'], z['data'], tuple(int(s) for s in z['shape']), z['y'], int(z['n_classes'])


def run_saev(inp: Path, out: Path, max_iter: int):
    "In saev's venv: its Sparse1DProbe exactly as its worker_fn calls it (float32, slabs of 8 classes), on the CPU."
    import logging, torch
    torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))
    from tdiscovery.probe1d import Sparse1DProbe
    logging.disable(logging.WARNING)
    indptr, indices, data, shape, y, C = load(inp)
    x = torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(indices), torch.from_numpy(data), size=shape)
    yy = torch.zeros(shape[0], C, dtype=torch.float32); yy[torch.arange(shape[0]), torch.from_numpy(y)] = 1.
    probe = Sparse1DProbe(n_latents=shape[1], n_classes=C, device='cpu', max_iter=max_iter)
    t0, c0 = time.perf_counter(), time.process_time(); probe.fit(x, yy)
    t_fit, c_fit = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time(); loss = probe.loss_matrix(x, yy.bool())
    t_loss, c_loss = time.perf_counter() - t0, time.process_time() - c0
    np.savez(out, w=probe.coef_.numpy(), b=probe.intercept_.numpy(), loss=loss.numpy(), t_fit=t_fit, t_loss=t_loss,
             c_fit=c_fit, c_loss=c_loss, n_iter=probe.n_iter_.numpy(), threads=torch.get_num_threads())


def codes_of(inp: Path):
    import torch
    from saev_nb.probe1d import Codes
    indptr, indices, data, shape, y, C = load(inp)
    rows = torch.repeat_interleave(torch.arange(shape[0]), torch.from_numpy(np.diff(indptr)))
    codes = Codes(rows, torch.from_numpy(indices).long(), torch.from_numpy(data).double(), shape[0], shape[1])
    return codes, torch.from_numpy(y), C


def run_ours(inp: Path, out: Path):
    "In this venv: saev_nb's fit_probes (train loss included)."
    import torch
    torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))
    import saev_nb.probe1d as P
    codes, y, C = codes_of(inp)
    t0, c0 = time.perf_counter(), time.process_time(); pr = P.fit_probes(codes, y, C)
    t_fit, c_fit = time.perf_counter() - t0, time.process_time() - c0
    np.savez(out, w=pr.w.numpy(), b=pr.b.numpy(), loss=pr.train_loss.numpy(), t_fit=t_fit, c_fit=c_fit,
             n_iter=pr.n_iter, max_grad=pr.max_grad, n_visited=pr.n_visited, threads=torch.get_num_threads())


def compare(inp: Path, saev_fpath: Path, ours_fpath: Path, conv_tol: float) -> dict:
    "One table row: times, agreement of the chosen latents, remaining gradients, loss differences."
    import torch
    from saev_nb.probe1d import prevalence, probe_grads
    codes, y, C = codes_of(inp)
    o = np.load(ours_fpath)
    row = dict(n=int(codes.n_rows), d=int(codes.n_latents), C=C, nnz=len(codes.vals), ours_s=float(o['t_fit']),
               ours_cpu=float(o['c_fit']), ours_iter=int(o['n_iter']), ours_grad=float(o['max_grad']))
    if 'n_visited' in o:  # values the Newton steps visited, in full passes over non-zeros x classes
        row['passes'] = float(o['n_visited']) / (row['nnz'] * C)
    if saev_fpath is None or not saev_fpath.exists(): return row
    s = np.load(saev_fpath)
    b0 = torch.logit(prevalence(y, C))[None].expand(codes.n_latents, C)
    s64, g = probe_grads(codes, y, torch.from_numpy(s['w']).double(), torch.from_numpy(s['b']).double(), b0,
                       torch.arange(C), LAM)
    conv = g.numpy() <= conv_tol
    dl = np.abs(s64['loss'].numpy() - o['loss'])  # float64 loss at saev's parameters: its optimisation alone
    dl_own = np.abs(s['loss'].astype(np.float64) - o['loss'])  # saev's own loss_matrix (float32 sums)
    row |= dict(saev_fit_s=float(s['t_fit']), saev_s=float(s['t_fit'] + s['t_loss']),
                saev_grad=float(g.max()), saev_conv=float(conv.mean()),
                agree=int((s['loss'].argmin(0) == o['loss'].argmin(0)).sum()),
                dloss_conv=float(dl[conv].max()) if conv.any() else math.nan, dloss_all=float(dl.max()),
                dloss_own=float(dl_own.max()))
    row |= dict(saev_cpu=float(s['c_fit'] + s['c_loss']), ratio=row['saev_s'] / row['ours_s'])
    row['cpu_ratio'] = row['saev_cpu'] / row['ours_cpu']
    return row


def table(rows: list[dict]) -> str:
    cols = [('n', 'patches', '{:,}'), ('d', 'd_sae', '{:,}'), ('C', 'classes', '{}'), ('nnz', 'non-zeros', '{:,}'),
            ('saev_s', 'saev s (fit+loss)', '{:.1f}'), ('ours_s', 'ours s', '{:.1f}'), ('ratio', 'ratio', '{:.1f}x'),
            ('saev_cpu', 'saev CPU s', '{:.1f}'), ('ours_cpu', 'ours CPU s', '{:.1f}'),
            ('cpu_ratio', 'CPU ratio', '{:.1f}x'),
            ('agree', 'same latent', '{}'), ('saev_conv', 'saev converged', '{:.1%}'),
            ('dloss_conv', 'max |dloss| conv.', '{:.1e}'), ('dloss_all', 'max |dloss| all', '{:.1e}'),
            ('dloss_own', "max |dloss| saev's float32 loss", '{:.1e}'),
            ('saev_grad', 'saev max grad', '{:.1e}'), ('ours_grad', 'ours max grad', '{:.1e}'),
            ('ours_iter', 'ours iters', '{}'), ('passes', 'ours full passes', '{:.1f}')]
    extra = {'agree': lambda r: f'/{r["C"]}'}
    fmt = lambda r, k, f: '-' if k not in r else f.format(r[k]) + extra.get(k, lambda r: '')(r)
    lines = ['| ' + ' | '.join(h for _, h, _ in cols) + ' |', '|' + '---|' * len(cols)]
    lines += ['| ' + ' | '.join(fmt(r, k, f) for k, _, f in cols) + ' |' for r in rows]
    return '\n'.join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('step', nargs='?', default='all', choices=['all', 'make', 'saev', 'ours'])
    ap.add_argument('--sizes', nargs='+', default=['100000:4096:8:32'], help='N:D:C:L0 (patches, latents, classes, '
                    'background draws per patch; repeated draws merge, so fewer non-zeros)')
    ap.add_argument('--saev-python', default='/work/saev-interop/venv/bin/python')
    ap.add_argument('--no-saev', action='store_true', help='time ours only')
    ap.add_argument('--work', type=Path, default=Path('/tmp/bench_probe1d'))
    ap.add_argument('--max-iter', type=int, default=30, help="saev's Newton steps (its default: 30)")
    ap.add_argument('--conv-tol', type=float, default=1e-5)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--reuse', action='store_true', help='compare the fits already in --work, fit only what is missing')
    ap.add_argument('--threads', type=int, default=1, help='torch threads of each side (1: CPU seconds count work, '
                    'not the spinning of idle threads on a busy machine)')
    ap.add_argument('--inp', type=Path); ap.add_argument('--out', type=Path)
    a = ap.parse_args()
    os.environ['OMP_NUM_THREADS'] = str(a.threads)  # before torch is imported, here and in the steps
    if a.step == 'saev': return run_saev(a.inp, a.out, a.max_iter)
    if a.step == 'ours': return run_ours(a.inp, a.out)
    a.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in a.sizes:
        n, d, C, l0 = size.split(':'); n, d, C, l0 = int(n), int(d), int(C), float(l0)
        inp = a.work / f'{n}_{d}_{C}_{l0:g}.npz'
        if not inp.exists(): make(n, d, C, l0, a.seed, inp)
        saev_out, ours_out = inp.with_suffix('.saev.npz'), inp.with_suffix('.ours.npz')
        if not a.no_saev and not (a.reuse and saev_out.exists()):
            subprocess.run([a.saev_python, str(HERE), 'saev', '--inp', str(inp), '--out', str(saev_out),
                            '--max-iter', str(a.max_iter), '--threads', str(a.threads)], check=True, cwd='/tmp')
        if not (a.reuse and ours_out.exists()):
            subprocess.run([sys.executable, str(HERE), 'ours', '--inp', str(inp), '--out', str(ours_out),
                            '--threads', str(a.threads)], check=True)
        rows.append(compare(inp, None if a.no_saev else saev_out, ours_out, a.conv_tol))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))


if __name__ == '__main__':
    main()
