"""saev_nb.loaders.ExampleReader: whole examples in storage order, against the stored bytes read with plain memmaps and
against labels.bin, for every token set, across shard boundaries and a partial last batch."""
import numpy as np
import pytest
import torch

from saev_nb.loaders import ExampleReader
from saev_nb.shards import Metadata, make_random_shards, open_shard

P = 12  # content tokens per example


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
