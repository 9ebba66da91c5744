"""Publishing RMT weights in timm's Hugging Face Hub layout.

:func:`write_hub_folder` turns a loaded RMT model into a folder that ``timm.create_model('local-dir:DIR',
pretrained=True)`` loads as it is, and that the Hub client uploads unchanged (``hf upload org/name DIR``),
after which ``timm.create_model('hf-hub:org/name', pretrained=True)`` loads it:

* ``config.json``, written by timm's ``save_for_hf``: the architecture, ``model_args`` (the constructor
  arguments, with ``token_label`` for token-labeling models), the pretrained cfg (input size, crop,
  mean / std, interpolation) and, for a 1000-class head, ImageNet's ``label_names`` and
  ``label_descriptions`` from timm's own class info;
* ``model.safetensors``: the weights in this project's names, with the model name and kwargs in its
  metadata (as ``scripts/convert_checkpoint.py`` writes them);
* ``README.md``: a model card in the Hub's format (YAML front matter, then the model, paper,
  parameters, GFLOPs at 224 px, the paper's top-1, the source file's sha256, how to load, parity).

The folder is written in a temporary folder beside it, loaded back through ``local-dir:``, and moved
into place only when the loaded model's outputs equal the given model's exactly. ``scripts/
convert_checkpoint.py SOURCE --hub-dir DIR`` is the command.
"""
import hashlib
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional

import torch
from safetensors.torch import save as safetensors_save
from torch import nn

import timm
from timm.data import ImageNetInfo

from .checkpoint import model_metadata
from .flops import count_flops
from .model import MODEL_ARGS, RMT
from .atomic import atomic_replace, atomic_write

__all__ = ['HUB_FILES', 'PAPER_TOP1', 'write_hub_folder', 'model_card', 'file_sha256']

HUB_FILES = ('config.json', 'model.safetensors', 'README.md')

# The paper's ImageNet-1k top-1 at 224 px, for the released configurations (token labeling: the *_tl tags).
PAPER_TOP1 = {'rmt_t.in1k': 82.4, 'rmt_s.in1k': 84.1, 'rmt_s.in1k_tl': 84.8, 'rmt_b.in1k': 85.0,
              'rmt_b.in1k_tl': 85.6, 'rmt_l.in1k': 85.5, 'rmt_l.in1k_tl': 86.1}
ORIGIN = 'https://github.com/qhfan/RMT'
PAPER = 'https://arxiv.org/abs/2309.11523'
CITATION = '''@inproceedings{fan2024rmt,
  title={RMT: Retentive Networks Meet Vision Transformers},
  author={Fan, Qihang and Huang, Huaibo and Chen, Mingrui and Liu, Hongmin and He, Ran},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2024}
}'''


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _as_json(value: Any) -> Any:
    return [_as_json(v) for v in value] if isinstance(value, (tuple, list)) else value


def _released_tag(name: str, kwargs: Dict[str, Any]) -> Optional[str]:
    """``name.in1k`` / ``name.in1k_tl`` when ``kwargs`` build a released configuration with 1000 classes, else None."""
    if name not in MODEL_ARGS or kwargs.get('num_classes', 1000) != 1000 or kwargs.get('in_chans', 3) != 3:
        return None
    released = dict(decay_exponents=(2, 2, 2, 2), layer_init_values=1e-6, projection=1024, **MODEL_ARGS[name])
    if any(k in kwargs and _as_json(kwargs[k]) != _as_json(v) for k, v in released.items()):
        return None
    return f'{name}.in1k_tl' if kwargs.get('token_label') else f'{name}.in1k'


def model_card(model: RMT, name: str, kwargs: Dict[str, Any], repo_id: str, source: str, sha256: str,
               weights: str, gflops: float, verify_size: int, license: str = 'other') -> str:
    """The folder's README.md: YAML front matter the Hub reads, then what the weights are and how to load them."""
    released = _released_tag(name, kwargs)
    classes = model.num_classes
    params = sum(p.numel() for p in model.parameters())
    front = ['---', 'library_name: timm', 'pipeline_tag: image-classification', f'license: {license}']
    if license == 'other':
        front += ['license_name: rmt-authors-terms', f'license_link: {ORIGIN}']
    front += ['tags:', '- image-classification', '- timm', '- rmt']
    if classes == 1000:
        front += ['datasets:', '- imagenet-1k']
    front.append('---')
    top1 = (f'{PAPER_TOP1[released]} (the paper, ImageNet-1k validation, 224 px)' if released else
            'not reported (the paper reports the four released configurations on ImageNet-1k)')
    what = 'a token-labeling RMT classifier (its aux head is fused into the logits)' if model.token_label else \
        'an RMT image classifier'
    lines = front + [
        f'# Model card for {repo_id.split("/")[-1]}',
        '',
        f'`{name}`: {what}, from "RMT: Retentive Networks Meet Vision Transformers" (Fan et al., CVPR 2024). '
        f'Its weights are `{os.path.basename(source)}` in timm\'s layout, converted by the `rmt` package\'s '
        f'`scripts/convert_checkpoint.py`.',
        '',
        '## Model Details',
        '- **Model type:** image classification / feature backbone',
        f'- **Architecture:** `{name}`' + (' with token labeling' if model.token_label else ''),
        f'- **Parameters:** {params:,} ({params / 1e6:.1f} M)',
        f'- **GFLOPs (224 x 224, multiply-adds counted by fvcore, as the paper counts):** {gflops:.2f}',
        '- **Image size:** 224 x 224 (any size runs)',
        f'- **Classes:** {classes}' + (' (ImageNet-1k)' if classes == 1000 else ''),
        f'- **Top-1:** {top1}',
        f'- **Paper:** RMT: Retentive Networks Meet Vision Transformers, {PAPER}',
        f'- **Original:** {ORIGIN}',
        f'- **Source file:** `{os.path.basename(source)}` (weights `{weights}`), sha256 `{sha256}`',
        '- **License:** ' + (f'the authors\' terms; their repository ({ORIGIN}) has no license file'
                             if license == 'other' else license),
        '',
        '## Model Usage',
        'With the `rmt` package installed (importing it registers the RMT models with timm):',
        '```python',
        'import timm, torch',
        'import rmt',
        f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()",
        'config = timm.data.resolve_data_config(model=model)',
        'transform = timm.data.create_transform(**config)  # PIL image -> normalised tensor',
        f"backbone = timm.create_model('hf-hub:{repo_id}', pretrained=True, features_only=True)  # stage outputs",
        f"finetune = timm.create_model('hf-hub:{repo_id}', pretrained=True, num_classes=10)  # new classifier",
        '```',
        '',
        '## Parity',
        f'This folder, loaded with `timm.create_model(\'local-dir:...\', pretrained=True)`, gives outputs identical '
        f'(`torch.equal`) to `{os.path.basename(source)}` loaded by rmt, checked on random images at {verify_size} px '
        f'when the folder was written. rmt reproduces the released code\'s logits and stage features to a max abs '
        f'difference below 1e-4 (its test suite).',
        '',
        '## Citation',
        '```bibtex',
        CITATION,
        '```',
        '',
    ]
    return '\n'.join(lines)


def _pretrained_cfg(model: RMT, name: str, kwargs: Dict[str, Any], source: str, sha256: str,
                    license: str) -> Dict[str, Any]:
    tag = _released_tag(name, kwargs)
    suffix = '_tl' if model.token_label else ''
    cfg: Dict[str, Any] = dict(
        tag=tag.split('.', 1)[1] if tag else f'custom{suffix}',
        classifier=['head.fc', 'aux_head'] if model.token_label else 'head.fc',
        notes=[f'converted from {os.path.basename(source)} (sha256 {sha256}) by rmt scripts/convert_checkpoint.py'])
    if license != 'other':
        cfg['license'] = license
    return cfg


def _labels(num_classes: int) -> Dict[str, Any]:
    """ImageNet-1k's class names (synsets) and descriptions, from timm's package, for a 1000-class head."""
    if num_classes != 1000:
        return {}
    info = ImageNetInfo()
    return dict(label_names=list(info.label_names()), label_descriptions=info.label_descriptions(as_dict=True))


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _move_into(tmp: str, folder: str) -> None:
    """The verified files of ``tmp`` into ``folder``: the whole folder renamed when ``folder`` does not exist
    (or is empty), else each file renamed over its namesake; other files in ``folder`` are left alone."""
    if not os.path.exists(folder) or (os.path.isdir(folder) and not os.listdir(folder)):
        if os.path.isdir(folder):
            os.rmdir(folder)
        atomic_replace(tmp, folder)
        return
    for name in HUB_FILES:
        atomic_replace(os.path.join(tmp, name), os.path.join(folder, name))
    shutil.rmtree(tmp, ignore_errors=True)


def write_hub_folder(
        model: RMT,
        folder: str,
        name: str,
        kwargs: Dict[str, Any],
        source: str,
        weights: str = 'model',
        repo_id: Optional[str] = None,
        license: str = 'other',
        data_config: Optional[Dict[str, Any]] = None,
        verify_size: int = 224,
) -> List[str]:
    """Write ``model`` (an eval-mode :class:`~rmt.RMT` created as ``timm.create_model(name, **kwargs)`` and
    loaded from the file ``source``) to ``folder`` in timm's Hub layout; return the paths written.

    ``weights`` names what was taken from ``source`` (``model``, ``model_ema``, ``state_dict``, ...),
    ``repo_id`` (``org/name``) is what the card's loading lines use (default ``your-org/<folder name>``),
    ``license`` a Hub license id (``other``: the authors' terms), ``data_config`` a training run's
    preprocessing (``input_size``, ``crop_pct``, ``mean``, ``std``, ``interpolation``) where it is
    not the pretrained cfg's. The folder is loaded back through ``local-dir:`` before it takes the
    place of ``folder``; raises ``RuntimeError`` (nothing written) when its outputs on two random
    ``verify_size`` images differ from ``model``'s, ``ValueError`` when ``folder`` is a file.
    """
    folder = os.path.abspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f'{folder} is a file, expected a folder to write')
    repo_id = repo_id or f'your-org/{os.path.basename(folder)}'
    sha256 = file_sha256(source)
    gflops = count_flops(model, (model.in_chans, 224, 224)).flops / 1e9
    model_args = {k: _as_json(v) for k, v in kwargs.items() if k not in ('drop_rate', 'drop_path_rate')}
    if model.token_label:
        model_args['token_label'] = True  # the folder says so: it loads as a token-labeling model as it is
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(folder)}.', suffix='.tmp', dir=parent)
    try:
        timm.models.save_for_hf(
            model, tmp, safe_serialization=True, model_args=model_args, data_config=data_config,
            model_config=dict(pretrained_cfg=_pretrained_cfg(model, name, kwargs, source, sha256, license),
                              **_labels(model.num_classes)))
        # every file through atomic_write (on disk before the folder moves into place); the safetensors holds
        # save_for_hf's tensors with the model name and kwargs in its metadata, as convert_checkpoint writes them
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        metadata = model_metadata(name, model_args, weights=weights, source=os.path.basename(source), sha256=sha256)
        with open(os.path.join(tmp, 'config.json'), 'rb') as f:
            config = f.read()
        card = model_card(model, name, kwargs, repo_id, source, sha256, weights, gflops, verify_size, license)
        for file, data in (('model.safetensors', safetensors_save(tensors, metadata=metadata)),
                           ('config.json', config), ('README.md', card.encode())):
            atomic_write(os.path.join(tmp, file), lambda f, data=data: f.write(data))

        loaded = timm.create_model('local-dir:' + tmp, pretrained=True).eval()
        x = torch.randn(2, model.in_chans, verify_size, verify_size, generator=torch.Generator().manual_seed(0))
        expected, got = _outputs(model, x), _outputs(loaded, x)
        if type(loaded) is not type(model) or loaded.token_label != model.token_label or not torch.equal(expected, got):
            diff = (expected - got).abs().max().item() if expected.shape == got.shape else float('nan')
            raise RuntimeError(f'verification failed: the folder loaded through local-dir: gives other outputs than '
                               f'{source} (max abs difference {diff:.3g}); {folder} not written')
        _move_into(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [os.path.join(folder, f) for f in HUB_FILES]
