"""Weights the timm way: a released file published as a Hub folder (scripts/convert_checkpoint.py --hub-dir),
loaded back through ``local-dir:`` and through ``hf-hub:`` from an offline Hub cache on disk, and every other
source timm resolves; what does not fit fails in the same one line as the other loading paths."""
import hashlib
import json
import os
import re
import shutil

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file
from timm.data import ImageNetInfo
from timm.models import adapt_input_conv

import rmt
from rmt.hub import model_card, write_hub_folder

from tests.helpers import (
    SMALL_CHECKPOINT, SMALL_CONFIG, SMALL_TL_CHECKPOINT, assert_close, hub_cache_repo, load_script, load_small,
    one_line_error, run, small_kwargs)

convert_checkpoint = load_script('convert_checkpoint')
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
ROUTES = ('local-dir', 'hf-hub')


def outputs(model, x=X):
    with torch.no_grad():
        return model(x)


def pre_logits(model):
    with torch.no_grad():
        return model.forward_head(model.forward_features(X), pre_logits=True)


def publish(source, folder, *extra):
    """The publishing command, in-process: SOURCE --hub-dir FOLDER with the fixtures' small config."""
    return convert_checkpoint.main([str(source), '--hub-dir', str(folder), '--model', 'rmt_s', '--official-config',
                                    str(SMALL_CONFIG), '--verify-size', '64', *extra])


@pytest.fixture(scope='module', autouse=True)
def one_thread_module():
    """One thread for this file's small models, the published folders included: fast on a small shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def folders(tmp_path_factory, one_thread_module):
    """The two fixture checkpoints published as Hub folders: the classifier and the token-labeling model."""
    root = tmp_path_factory.mktemp('published')
    publish(SMALL_CHECKPOINT, root / 'rmt_s.in1k')
    publish(SMALL_TL_CHECKPOINT, root / 'rmt_s.in1k_tl')
    return {'rmt_s.in1k': root / 'rmt_s.in1k', 'rmt_s.in1k_tl': root / 'rmt_s.in1k_tl'}


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    """An empty Hugging Face Hub cache, offline: HF_HOME and HF_HUB_OFFLINE=1 in the environment, and the
    huggingface_hub constants that read them once, at import (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE), to match."""
    from huggingface_hub import constants
    home = tmp_path / 'hf_home'
    monkeypatch.setenv('HF_HOME', str(home))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.delenv('HF_HUB_CACHE', raising=False)
    monkeypatch.setattr(constants, 'HF_HOME', str(home))
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(home / 'hub'))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    return home / 'hub'


@pytest.fixture
def name_of(request, folders, tmp_path):
    """``name_of(key_or_folder)``: the model name that loads a published folder by this test's route (``local-dir:``,
    or ``hf-hub:org/NAME`` from the offline Hub cache)."""
    route = request.param
    cache = request.getfixturevalue('hub_cache') if route == 'hf-hub' else None

    def name_of(folder):
        folder = folders.get(folder, folder)
        if route == 'local-dir':
            return f'local-dir:{folder}'
        hub_cache_repo(cache, f'org/{os.path.basename(folder)}', folder)
        return f'hf-hub:org/{os.path.basename(folder)}'
    return name_of


by_route = pytest.mark.parametrize('name_of', ROUTES, indirect=True)


# --- loading a published folder -------------------------------------------------------------------------

@by_route
def test_published_classifier_gives_the_source_files_outputs(name_of, small_model, expected):
    model = timm.create_model(name_of('rmt_s.in1k'), pretrained=True).eval()
    assert torch.equal(outputs(model), outputs(small_model))
    for size, case in expected.items():  # and so the released code's, to the parity tolerance
        assert_close(outputs(model, case['input']), case['logits'], atol=1e-4, name=str(size))


@by_route
def test_published_token_labeling_model_loads_as_one_without_arguments(name_of, expected_tl):
    model = timm.create_model(name_of('rmt_s.in1k_tl'), pretrained=True).eval()
    assert model.token_label and isinstance(model.aux_head, torch.nn.Linear)
    assert torch.equal(outputs(model), outputs(load_small(SMALL_TL_CHECKPOINT, token_label=True)))
    case = expected_tl['64x64']
    assert_close(outputs(model, case['input']), case['logits'], atol=1e-4)


@by_route
def test_features_only_backbone_from_a_published_folder_gives_the_source_features(name_of, expected):
    backbone = timm.create_model(name_of('rmt_s.in1k'), pretrained=True, features_only=True).eval()
    for ours, theirs in zip(outputs(backbone, expected['70x50']['input']), expected['70x50']['stage_features'],
                            strict=True):
        assert_close(ours, theirs, atol=1e-4)
    normed = timm.create_model(name_of('rmt_s.in1k'), pretrained=True, features_only=True, feature_norm=True).eval()
    source = timm.create_model('rmt_t', pretrained=True, features_only=True, feature_norm=True,
                               pretrained_cfg_overlay=dict(file=str(SMALL_CHECKPOINT)), **small_kwargs()).eval()
    assert all(torch.equal(a, b) for a, b in zip(outputs(normed), outputs(source), strict=True))


@by_route
def test_new_class_count_from_a_published_folder_resets_only_the_classifier(name_of, small_model):
    model = timm.create_model(name_of('rmt_s.in1k'), pretrained=True, num_classes=5).eval()
    assert model.get_classifier().out_features == 5 and outputs(model).shape == (2, 5)
    assert torch.equal(pre_logits(model), pre_logits(small_model))


def test_new_channel_count_from_a_published_folder_adapts_the_stem_as_timm_does(folders, small_model):
    model = timm.create_model(f'local-dir:{folders["rmt_s.in1k"]}', pretrained=True, in_chans=1).eval()
    assert torch.equal(model.stem.conv1.weight, adapt_input_conv(1, small_model.stem.conv1.weight))
    assert torch.equal(model.stages[0].blocks[0].attn.q.weight, small_model.stages[0].blocks[0].attn.q.weight)
    assert outputs(model, X[:, :1]).shape == (2, 10)


# --- what does not fit: the same one-line errors ----------------------------------------------------------

def _copy(folders, tmp_path, name='rmt_s.broken'):
    folder = tmp_path / name
    shutil.copytree(folders['rmt_s.in1k'], folder)
    return folder


@by_route
def test_published_weights_of_another_variant_are_the_one_line_misfit_error(name_of, folders, tmp_path):
    folder = _copy(folders, tmp_path)
    other = timm.create_model('rmt_t', **small_kwargs(embed_dims=(32, 64, 96, 128), depths=(1, 3, 1, 1)))
    save_file(other.state_dict(), str(folder / 'model.safetensors'))
    with pytest.raises(ValueError) as err:
        timm.create_model(name_of(folder), pretrained=True)
    message = str(err.value)
    assert re.match(r'\S+/model\.safetensors does not fit this RMT model \| shape mismatches \(', message), message
    assert 'missing keys (' in message and 'unexpected keys (' in message
    assert '\n' not in message and len(message) < 1500


@by_route
def test_truncated_published_weights_are_the_one_line_error_naming_the_file(name_of, folders, tmp_path):
    folder = _copy(folders, tmp_path)
    data = (folder / 'model.safetensors').read_bytes()
    (folder / 'model.safetensors').write_bytes(data[:len(data) // 2])
    with pytest.raises(RuntimeError, match=r'cannot read checkpoint \S+model.safetensors: the .safetensors file is '
                                           r'truncated or corrupted') as err:
        timm.create_model(name_of(folder), pretrained=True)
    assert '\n' not in str(err.value)


@by_route
def test_published_folder_without_weights_names_where_it_looked(name_of, folders, tmp_path):
    folder = _copy(folders, tmp_path)
    (folder / 'model.safetensors').unlink()
    with pytest.raises(FileNotFoundError, match=r'rmt_s.broken (holds no weights file|has no weights file)') as err:
        timm.create_model(name_of(folder), pretrained=True)
    assert '\n' not in str(err.value)


# --- every source timm resolves, and none ----------------------------------------------------------------

def test_every_source_timm_resolves_loads_the_same_weights(small_model, tmp_path):
    released = rmt.load_checkpoint_file(SMALL_CHECKPOINT)['model']
    sources = {
        'pretrained_cfg file': dict(pretrained_cfg=dict(file=str(SMALL_CHECKPOINT))),
        'overlay state_dict': dict(pretrained_cfg_overlay=dict(state_dict=released)),
        'pretrained_cfg state_dict': dict(pretrained_cfg=dict(state_dict=released)),
        'overlay url': dict(pretrained_cfg_overlay=dict(url=SMALL_CHECKPOINT.as_uri()), cache_dir=str(tmp_path)),
    }
    for source, kwargs in sources.items():
        model = timm.create_model('rmt_t', pretrained=True, **kwargs, **small_kwargs()).eval()
        assert torch.equal(outputs(model), outputs(small_model)), source


@pytest.mark.parametrize('name', ['rmt_s', 'rmt_s.in1k_tl', 'rmt_l.in1k'])
def test_pretrained_on_a_bare_tag_is_still_the_one_line_refusal(name):
    with pytest.raises(RuntimeError, match=r"the released RMT weights are not hosted; pass the downloaded file, .*"
                                           r"pretrained_cfg_overlay=dict\(file='RMT-S.pth'\)\), or a published "
                                           r"folder: 'local-dir:DIR' or 'hf-hub:org/name'") as err:
        timm.create_model(name, pretrained=True)
    assert '\n' not in str(err.value)


# --- the published folder --------------------------------------------------------------------------------

def front_matter(card: str) -> dict:
    assert card.startswith('---\n')
    return yaml.safe_load(card.split('---\n')[1])


def test_published_folder_holds_exactly_timms_hub_files(folders):
    for folder in folders.values():
        assert sorted(os.listdir(folder)) == ['README.md', 'config.json', 'model.safetensors']
    assert not [f for f in os.listdir(folders['rmt_s.in1k'].parent) if f.startswith('.')]  # no temporary left


def test_published_config_names_the_architecture_its_arguments_and_preprocessing(folders):
    config = json.loads((folders['rmt_s.in1k'] / 'config.json').read_text())
    assert config['architecture'] == 'rmt_s' and config['num_classes'] == 10
    assert config['model_args'] == dict(json.loads(json.dumps(small_kwargs())), in_chans=3, global_pool='avg')
    cfg = config['pretrained_cfg']
    assert (cfg['input_size'], cfg['crop_pct'], cfg['interpolation']) == ([3, 224, 224], 0.875, 'bicubic')
    assert (cfg['mean'], cfg['std']) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert 'label_names' not in config and 'hf_hub_id' not in cfg and 'file' not in cfg
    tl = json.loads((folders['rmt_s.in1k_tl'] / 'config.json').read_text())
    assert tl['model_args']['token_label'] is True and tl['pretrained_cfg']['classifier'] == ['head.fc', 'aux_head']


def test_published_weights_name_their_model_for_the_scripts(folders):
    name, kwargs = rmt.checkpoint.read_model_metadata(folders['rmt_s.in1k'] / 'model.safetensors')
    assert name == 'rmt_s' and kwargs['embed_dims'] == (16, 32, 48, 64) and kwargs['num_classes'] == 10


def test_model_card_front_matter_parses_and_the_card_names_source_size_and_loading(folders):
    card = (folders['rmt_s.in1k'] / 'README.md').read_text()
    meta = front_matter(card)
    assert meta['library_name'] == 'timm' and meta['license'] == 'other'
    assert {'timm', 'image-classification', 'rmt'} <= set(meta['tags'])
    assert 'datasets' not in meta  # 10 classes: not ImageNet
    assert hashlib.sha256(SMALL_CHECKPOINT.read_bytes()).hexdigest() in card
    params = sum(p.numel() for p in load_small().parameters())
    assert f'**Parameters:** {params:,}' in card and 'GFLOPs (224 x 224' in card
    assert "timm.create_model('hf-hub:your-org/rmt_s.in1k', pretrained=True)" in card
    assert 'identical (`torch.equal`)' in card and 'arxiv.org/abs/2309.11523' in card


def test_thousand_class_folder_carries_imagenet_labels_and_dataset(tmp_path):
    model = timm.create_model('rmt_t', **small_kwargs(num_classes=1000)).eval()
    torch.save({'model': model.state_dict()}, tmp_path / 'in1k.pth')
    publish(tmp_path / 'in1k.pth', tmp_path / 'hub', '--repo-id', 'me/rmt-small', '--license', 'apache-2.0')
    config = json.loads((tmp_path / 'hub' / 'config.json').read_text())
    info = ImageNetInfo()
    assert config['label_names'] == info.label_names() and len(config['label_names']) == 1000
    assert config['label_descriptions'] == info.label_descriptions(as_dict=True)
    card = (tmp_path / 'hub' / 'README.md').read_text()
    assert front_matter(card)['datasets'] == ['imagenet-1k'] and front_matter(card)['license'] == 'apache-2.0'
    assert "'hf-hub:me/rmt-small'" in card
    loaded = timm.create_model(f'local-dir:{tmp_path / "hub"}', pretrained=True).eval()
    assert torch.equal(outputs(loaded), outputs(model))


def test_card_of_a_released_configuration_states_the_papers_top1():
    model = timm.create_model('rmt_s', token_label=True, device='meta')
    card = model_card(model, 'rmt_s', dict(num_classes=1000, token_label=True), 'org/rmt_s.in1k_tl', 'RMT-S-TL.pth',
                      '0' * 64, 'model', 4.8, 224)
    assert '**Top-1:** 84.8 (the paper' in card and '**Parameters:** 27,480,240' in card
    custom = model_card(model, 'rmt_s', dict(num_classes=1000, token_label=True, projection=512), 'org/x', 'x.pth',
                        '0' * 64, 'model', 1.0, 224)
    assert '**Top-1:** not reported' in custom


def test_a_folder_that_does_not_reproduce_the_source_is_not_written(tmp_path, monkeypatch, small_model):
    real_save = rmt.hub.safetensors_save

    def perturbed(tensors, metadata=None):
        return real_save(dict(tensors, **{'head.fc.bias': tensors['head.fc.bias'] + 1e-3}), metadata=metadata)

    monkeypatch.setattr(rmt.hub, 'safetensors_save', perturbed)
    with pytest.raises(RuntimeError, match=r'verification failed: the folder loaded through local-dir: gives other '
                                           r'outputs than .* \(max abs difference 0.001\); .*hub not written'):
        write_hub_folder(small_model, str(tmp_path / 'hub'), 'rmt_t', small_kwargs(), str(SMALL_CHECKPOINT),
                         verify_size=32)
    assert os.listdir(tmp_path) == []


def test_publishing_into_an_existing_folder_replaces_its_three_files_and_keeps_the_rest(tmp_path, small_model):
    folder = tmp_path / 'clone'
    folder.mkdir()
    (folder / '.gitattributes').write_text('*.safetensors filter=lfs\n')
    (folder / 'README.md').write_text('old card')
    write_hub_folder(small_model, str(folder), 'rmt_t', small_kwargs(), str(SMALL_CHECKPOINT), verify_size=32)
    assert sorted(os.listdir(folder)) == ['.gitattributes', 'README.md', 'config.json', 'model.safetensors']
    assert (folder / '.gitattributes').read_text() == '*.safetensors filter=lfs\n'
    assert front_matter((folder / 'README.md').read_text())['library_name'] == 'timm'
    assert sorted(os.listdir(tmp_path)) == ['clone']


@pytest.mark.parametrize('argv, error', [
    (['x.safetensors', '--hub-dir', 'd'],
     'give either OUTPUT (a .safetensors file) or --hub-dir DIR (a Hub folder), not both'),
    ([], 'OUTPUT or --hub-dir DIR is required'),
    (['--hub-dir', str(SMALL_CHECKPOINT)], f'--hub-dir {SMALL_CHECKPOINT}: a file, expected a folder to write'),
])
def test_publishing_command_mistakes_are_one_line(capsys, argv, error):
    line = one_line_error(capsys, convert_checkpoint.main, [str(SMALL_CHECKPOINT), *argv])
    assert line == f'PROG: error: {error}'


@pytest.mark.slow
def test_hf_hub_route_with_only_the_environment_set(folders, tmp_path, small_model):
    """What a user does: HF_HOME and HF_HUB_OFFLINE=1 in the environment of a fresh interpreter, nothing patched."""
    hub_cache_repo(tmp_path / 'hf_home' / 'hub', 'org/rmt_s.in1k', folders['rmt_s.in1k'])
    torch.save(X, tmp_path / 'x.pt')
    code = ('import sys, timm, torch, rmt; m = timm.create_model("hf-hub:org/rmt_s.in1k", pretrained=True).eval(); '
            'x = torch.load(sys.argv[1]); torch.save(m(x).detach(), sys.argv[2])')
    env = dict(HF_HOME=str(tmp_path / 'hf_home'), HF_HUB_OFFLINE='1')
    run(['-c', code, tmp_path / 'x.pt', tmp_path / 'y.pt'], extra_env=env)
    assert torch.equal(torch.load(tmp_path / 'y.pt'), outputs(small_model))
