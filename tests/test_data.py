"""The data step from the outside: the `make-data` command, the ADE20K layout, and bad input."""
import subprocess, sys
import numpy as np
import pytest
from PIL import Image
from saev_nb.data import SegFolder, ImgFolder, DataError, make_scenes, read_class_names, N_CLASSES

def test_make_data_cli_layout(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'saev_nb.cli', 'make-data', '--root', str(tmp_path/'ade'), '--n-train', '5', '--n-val', '2', '--seed', '3'],
                       capture_output=True, text=True, check=True)
    root = tmp_path/'ade'
    assert r.stdout.strip().splitlines()[-1] == str(root)
    assert sorted(p.name for p in (root/'images/training').iterdir()) == [f'ADE_train_{i:08d}.jpg' for i in range(1, 6)]
    assert sorted(p.name for p in (root/'annotations/validation').iterdir()) == ['ADE_val_00000001.png', 'ADE_val_00000002.png']
    header = (root/'objectInfo150.csv').read_text().splitlines()[0]
    assert header == 'Idx,Ratio,Train,Val,Name'
    names = read_class_names(root)
    assert len(names) == N_CLASSES and names[0] == 'other' and names[1] == 'wall'

def test_labels_uint8_in_range_and_several_regions(tmp_path):
    root = make_scenes(tmp_path/'ade', n_train=8, n_val=1, n_classes=5, progress=False)
    ds = SegFolder(root)
    for i in range(len(ds)):
        lab = ds[i]['labels']
        assert lab.dtype == np.uint8 and lab.max() <= 5
        assert len(np.unique(lab)) >= 2, 'a scene holds several regions'

def test_classes_not_separable_from_one_pixel_colour(tmp_path):
    "Class colours overlap (pairs share a colour family) so a probe needs texture, not just one pixel."
    root = make_scenes(tmp_path/'ade', n_train=12, n_val=0, n_classes=4, progress=False)
    ds = SegFolder(root)
    px, lab = [], []
    for i in range(len(ds)):
        it = ds[i]; px.append(np.asarray(it['image'], np.float32).reshape(-1, 3)); lab.append(it['labels'].ravel())
    px, lab = np.concatenate(px), np.concatenate(lab)
    keep = lab > 0
    px, lab = px[keep], lab[keep]
    # nearest-class-mean on a single pixel's colour
    means = np.stack([px[lab == c].mean(0) for c in range(1, 5)])
    pred = 1 + ((px[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    acc = (pred == lab).mean()
    assert acc < 0.9, f'single-pixel colour already separates classes ({acc:.2f})'

def test_real_ade20k_txt_class_table(tmp_path):
    root = make_scenes(tmp_path/'ade', n_train=1, n_val=0, progress=False)
    (root/'objectInfo150.csv').unlink()
    (root/'objectInfo150.txt').write_text('Idx\tRatio\tTrain\tVal\tName\n1\t0.1\t1\t1\twall\n2\t0.1\t1\t1\tbuilding;edifice\n')
    names = read_class_names(root)
    assert names[2] == 'building' and len(names) == N_CLASSES

def test_bad_inputs_name_the_file(tmp_path):
    root = make_scenes(tmp_path/'ade', n_train=2, n_val=0, progress=False)
    with pytest.raises(DataError, match='no such folder'): SegFolder(root, 'testing')
    with pytest.raises(DataError, match='empty split'): SegFolder(root, 'validation')
    (root/'objectInfo150.csv').write_text('foo,bar\n1,2\n')
    with pytest.raises(DataError, match='objectInfo150.csv: expected columns Idx and Name'): SegFolder(root)
    with pytest.raises(DataError, match='n_classes must be in 1..150'): make_scenes(tmp_path/'x', n_classes=151)
    with pytest.raises(DataError, match='no such folder'): ImgFolder(tmp_path/'none')
    (tmp_path/'imgs'/'a').mkdir(parents=True)
    with pytest.raises(DataError, match='empty data set'): ImgFolder(tmp_path/'imgs')


def _seg_shards_cmd(root, tmp_path):
    return ('shards', '--shards-root', tmp_path/'shards', '--n-workers', 0, 'data:img-seg-folder', '--data.root', root)

@pytest.mark.parametrize('row', ['200,0.1,1,1,tree', 'seven,0.1,1,1,tree'])
def test_class_table_row_out_of_range_or_not_a_number_is_one_line(tmp_path, row):
    "objectInfo150.csv with Idx 200 or 'seven': one line naming the file and the row (not IndexError/ValueError)."
    from helpers import cli_fails
    root = make_scenes(tmp_path/'ade', n_train=2, n_val=0, progress=False)
    (root/'objectInfo150.csv').write_text(f'Idx,Ratio,Train,Val,Name\n1,0.1,1,1,wall\n{row}\n')
    cli_fails(*_seg_shards_cmd(root, tmp_path), env={'TQDM_DISABLE': '1'},
              contains=f"{root/'objectInfo150.csv'}: line 3: Idx {row.split(',')[0]!r}")
    assert not (tmp_path/'shards').exists() or not list((tmp_path/'shards').rglob('acts*.bin'))

def test_16_bit_mask_reports_the_value_in_the_file(tmp_path):
    "A 16-bit annotation holding 300 is reported as label 300 (not 255, which the 8-bit conversion clipped it to)."
    from helpers import cli_fails
    root = make_scenes(tmp_path/'ade', n_train=2, n_val=0, progress=False)
    ann = sorted((root/'annotations'/'training').iterdir())[1]
    size = Image.open(ann).size[::-1]
    Image.fromarray(np.full(size, 300, np.uint16)).save(ann)
    assert Image.open(ann).mode == 'I;16'
    cli_fails(*_seg_shards_cmd(root, tmp_path), env={'TQDM_DISABLE': '1'},
              contains=f'{ann}: label 300 outside 0 (other) .. 150 (I;16 mask); save the annotation as an 8-bit PNG')
    Image.fromarray(np.full(size, 4, np.uint16)).save(ann)  # a 16-bit mask of valid labels reads as they are
    assert np.unique(SegFolder(root)[1]['labels']).tolist() == [4]


def test_make_data_hard_same_seed_same_bytes_ade_layout(tmp_path):
    """`make-data` (installed script; hard scenes by default) and `make_scenes(hard=True)` (in-process) write the same
    bytes, ADE layout; `make-data --no-hard` writes the easy scenes."""
    from helpers import cli
    args = ('--n-train', 4, '--n-val', 2, '--seed', 5, '--size', 64)
    cli('make-data', '--root', tmp_path/'a', *args, env={'TQDM_DISABLE': '1'})
    cli('make-data', '--root', tmp_path/'e', '--no-hard', *args, env={'TQDM_DISABLE': '1'})
    b = make_scenes(tmp_path/'b', n_train=4, n_val=2, seed=5, size=64, progress=False, hard=True)
    files = sorted(str(p.relative_to(b)) for p in b.rglob('*') if p.is_file())
    assert files == sorted(str(p.relative_to(tmp_path/'a')) for p in (tmp_path/'a').rglob('*') if p.is_file())
    assert {'objectInfo150.csv', 'labels.csv', 'images/training/ADE_train_00000004.jpg',
            'annotations/validation/ADE_val_00000002.png'} <= set(files)
    assert all((tmp_path/'a'/f).read_bytes() == (b/f).read_bytes() for f in files)
    easy = make_scenes(tmp_path/'easy', n_train=4, n_val=2, seed=5, size=64, progress=False)
    assert (easy/files[-1]).read_bytes() != (b/files[-1]).read_bytes() == (tmp_path/'a'/files[-1]).read_bytes()
    assert (easy/files[-1]).read_bytes() == (tmp_path/'e'/files[-1]).read_bytes()
    assert read_class_names(b) == read_class_names(easy) and read_class_names(b)[8] == 'bed'
    ds = SegFolder(b)
    for i in range(len(ds)):
        lab = ds[i]['labels']
        assert lab.dtype == np.uint8 and lab.max() <= 8 and len(np.unique(lab)) >= 2


def test_hard_scenes_colour_does_not_name_the_class(tmp_path):
    "On hard scenes a nearest-class-mean on one pixel's colour is near the majority rate (easy scenes: well above)."
    def colour_acc(root):
        ds = SegFolder(root)
        px = np.concatenate([np.asarray(ds[i]['image'], np.float32).reshape(-1, 3) for i in range(len(ds))])
        lab = np.concatenate([ds[i]['labels'].ravel() for i in range(len(ds))])
        px, lab = px[lab > 0][::5], lab[lab > 0][::5]
        cls = np.unique(lab)
        means = np.stack([px[lab == c].mean(0) for c in cls])
        return (cls[((px[:, None] - means[None]) ** 2).sum(-1).argmin(1)] == lab).mean()
    hard = colour_acc(make_scenes(tmp_path/'h', n_train=16, n_val=0, size=64, progress=False, hard=True))
    easy = colour_acc(make_scenes(tmp_path/'e', n_train=16, n_val=0, size=64, progress=False))
    assert hard < 0.35 and hard < easy - 0.15, (hard, easy)
