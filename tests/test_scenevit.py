"""saev_nb.scenevit from the outside: `make-model` at a reduced size through the installed console script, bad input,
determinism, and the shipped `saev-tiny/scenes` weights (hash, loading through `load_vit`, recording shards)."""
import hashlib
import pytest
import torch

from helpers import cli, cli_in_process, cli_in_process_fails
from saev_nb.models import load_vit, record, shipped_weights
from saev_nb.scenevit import MakeModelConfig, build_scene_vit, save_scene_vit, read_card, SCENES_CKPT, CONTROL_CKPT

# the shipped file's sha256; `saev_nb make-model --out saev_nb/assets/saev-tiny-scenes.safetensors` rebuilds it (same
# machine and torch: identical bytes); change this line only together with the file
SHIPPED_SHA256 = '8cd93b7b8e4bb8a323e8bfda5273e9706bcf80730ad21236b8c29243513312d9'
TINY_ARGS = ('--steps', 2, '--batch-size', 4, '--n-train', 8, '--n-val', 4, '--size', 48)


def test_make_model_cli_reduced_size_loads(tmp_path):
    "A reduced rebuild through the installed script writes a weights file that load_vit serves and read_card reads."
    out = tmp_path/'w.safetensors'
    r = cli('make-model', '--out', out, *TINY_ARGS, env={'TQDM_DISABLE': '1'})
    assert r.stdout.strip().splitlines()[-1].startswith(f'{out}: 2 steps in')
    vit = load_vit('clip', f'saev-tiny/{out}')
    assert (vit.d_model, vit.n_layers, vit.n_patches) == (128, 4, 64)
    card = read_card(out)
    assert card['steps'] == 2 and card['sha256'] == hashlib.sha256(out.read_bytes()).hexdigest()


def test_make_model_is_deterministic(tmp_path):
    "Same recipe, same bytes (fixed threads, deterministic algorithms, seeded data, one metadata entry); seed 1 not."
    cfg = MakeModelConfig(steps=2, batch_size=4, n_train=6, n_val=2, size=48)
    a, b = (save_scene_vit(build_scene_vit(cfg, progress=False)[0], tmp_path/f'{i}.safetensors', cfg, {})
            for i in range(2))
    assert a.read_bytes() == b.read_bytes()
    a = load_vit('clip', f'saev-tiny/{a}').state_dict()
    c = build_scene_vit(MakeModelConfig(steps=2, batch_size=4, n_train=6, n_val=2, size=48, seed=1), progress=False)[0]
    assert not torch.equal(a['model.conv1.weight'], c.state_dict()['model.conv1.weight'])


@pytest.mark.parametrize('args,msg', [(('--steps', 0), '--steps 0: must be at least 1'),
                                      (('--n-classes', 151), '--n-classes 151: must be in 1..150')])
def test_make_model_bad_input_is_one_line(tmp_path, args, msg):
    cli_in_process_fails('make-model', '--out', tmp_path/'w.safetensors', *args, contains=msg)
    assert not (tmp_path/'w.safetensors').exists()


def test_shipped_file_hash_and_card():
    fpath = shipped_weights(SCENES_CKPT)
    assert fpath.is_file() and fpath.stat().st_size < 5_000_000
    assert hashlib.sha256(fpath.read_bytes()).hexdigest() == SHIPPED_SHA256
    card = read_card()
    assert card['ckpt'] == SCENES_CKPT and card['sha256'] == SHIPPED_SHA256 and 'no masks' in card['objective']


def test_shipped_model_loads_through_load_vit():
    "The learned model is the control's architecture with other weights, and records like any checkpoint."
    learned, control = load_vit('clip', SCENES_CKPT), load_vit('clip', CONTROL_CKPT)
    assert learned.ckpt == SCENES_CKPT and (learned.grid, learned.d_model) == (control.grid, control.d_model)
    assert learned.state_dict().keys() == control.state_dict().keys()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(): a, b = record(learned, x, [-1]), record(control, x, [-1])
    assert a.shape == b.shape == (2, 1, 65, 128) and not torch.allclose(a, b)


def test_shipped_model_records_shards(tmp_path):
    "`saev_nb shards --ckpt saev-tiny/scenes` records hard scenes; the metadata names the checkpoint."
    from saev_nb.data import make_scenes
    from saev_nb.shards import Metadata
    root = make_scenes(tmp_path/'ade', n_train=4, n_val=0, size=48, progress=False, hard=True)
    r = cli_in_process('shards', '--shards-root', tmp_path/'shards', '--n-workers', 0, '--ckpt', SCENES_CKPT,
                       '--layers', 3, 'data:img-seg-folder', '--data.root', root, env={'TQDM_DISABLE': '1'})
    md = Metadata.load(r.stdout.strip().splitlines()[-1])
    assert (md.ckpt, md.n_examples, md.layers) == (SCENES_CKPT, 4, (3,))
