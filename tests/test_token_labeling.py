"""Token labeling: label files, the joint augmentation, dense targets, MixToken, the loss, and the label writer."""
import json
import math
import os
import random
import re

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import rmt  # noqa: F401  (registers the models)
from rmt.mixtoken import (
    MixTokenBox, TokenLabelOutput, mix_tokens, mixtoken_lam, sample_mixtoken_box, unmix_tokens)
from rmt.token_labeling import (
    META_FILE, DenseTeacher, TokenLabelDataset, TokenLabelLoss, TokenLabelTransform, dense_targets, label_file_path,
    pack_target, read_label_file, unpack_targets)
from rmt.tools.cli import ScriptError
from rmt.tools.train_utils import allow_posterize_to_zero_bits
from tests.helpers import load_script, small_kwargs, write_digits_folder

make_token_labels = load_script('make_token_labels')
pytestmark = pytest.mark.usefixtures('one_thread')

TINY_RMT = dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), projection=32)
TINY_RMT_ARGS = [f'{k}={v}'.replace(' ', '') for k, v in TINY_RMT.items()]  # the same, as --model-kwargs

# A 2x2 label map, top-1 per cell, 3 classes: (row, col) -> (class, logit)
CELLS = {(0, 0): (0, 2.), (0, 1): (1, 4.), (1, 0): (2, 1.), (1, 1): (1, 2.)}
SMOOTHING = 0.1


def cells_map() -> torch.Tensor:
    label_map = torch.zeros(2, 1, 2, 2)
    for (r, c), (cls, logit) in CELLS.items():
        label_map[:, 0, r, c] = torch.tensor([logit, float(cls)])
    return label_map


def target(logits) -> torch.Tensor:
    """The spec's target for per-class logits: softmax over the classes, then label smoothing."""
    exp = [math.exp(v) for v in logits]
    off = SMOOTHING / len(logits)
    return torch.tensor([e / sum(exp) * (1 - SMOOTHING + off) + off for e in exp])


def write_images(root, size=(4, 4), names=('a/x.png', 'a/y.png', 'b/z.png')):
    for i, name in enumerate(names):
        os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
        Image.new('RGB', size, (40 * i, 0, 0)).save(os.path.join(root, name))
    return timm.data.create_dataset('', root=str(root))


# --- label files ---------------------------------------------------------------------------------------

def test_label_file_mirrors_the_image_path_with_suffix_pt():
    assert label_file_path('labels', 'n01440764/n01440764_10026.JPEG') == \
        os.path.join('labels', 'n01440764', 'n01440764_10026.pt')


def test_released_label_file_reads_as_written(tmp_path):
    # written as the released label script does: top-5 values and ids, float16, [2, 5, 18, 18]
    torch.manual_seed(0)
    values, ids = torch.randn(18, 18, 1000).mul(5).topk(5)
    torch.save(torch.stack([values.half(), ids.half()]).permute(0, 3, 1, 2), tmp_path / 'img.pt')
    label_map = read_label_file(str(tmp_path / 'img.pt'), num_classes=1000)
    assert label_map.shape == (2, 5, 18, 18) and label_map.dtype == torch.float32
    assert torch.equal(label_map[1].long(), ids.permute(2, 0, 1))
    assert torch.equal(label_map[0], values.half().float().permute(2, 0, 1))


@pytest.mark.parametrize('content, message', [
    (torch.zeros(5, 18, 18), 'expected [2, k, h, w]'),
    (torch.stack([torch.ones(1, 2, 2), torch.full((1, 2, 2), 7.)]), 'class id 7'),
    (torch.stack([torch.ones(1, 2, 2), torch.full((1, 2, 2), 0.5)]), 'whole numbers'),
    (torch.stack([torch.ones(2, 2, 2), torch.zeros(2, 2, 2)]), 'repeats a class id'),
    (torch.stack([torch.full((1, 2, 2), float('nan')), torch.zeros(1, 2, 2)]), 'non-finite'),
    ({'not': 'a tensor'}, 'holds a dict'),
    (b'truncated', 'cannot read'),
])
def test_malformed_label_file_is_an_error_naming_it(tmp_path, content, message):
    path = tmp_path / 'bad.pt'
    if isinstance(content, bytes):
        torch.save(torch.zeros(2, 1, 2, 2), path)
        path.write_bytes(path.read_bytes()[:40])
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        read_label_file(str(path), num_classes=5)
    assert str(path) in str(e.value)


def test_label_file_with_code_is_refused_not_run(tmp_path):
    path = tmp_path / 'evil.pt'
    torch.save(os.getcwd, path)  # unpickling would call into os
    with pytest.raises(ValueError, match='objects other than tensors'):
        read_label_file(str(path))


def test_packed_target_unpacks_to_class_box_and_map():
    label_map = cells_map()
    packed = torch.stack([pack_target(2, (0., .5, 1., 1.), label_map), pack_target(0, (.25, 0., .75, .5), label_map)])
    classes, boxes, label_maps = unpack_targets(packed)
    assert classes.tolist() == [2, 0]
    assert boxes.tolist() == [[0., .5, 1., 1.], [.25, 0., .75, .5]]
    assert torch.equal(label_maps, torch.stack([label_map, label_map]))


# --- dense targets -------------------------------------------------------------------------------------

def test_dense_targets_of_the_right_half_crop_are_its_cells():
    crop, tokens = dense_targets(cells_map()[None], torch.tensor([[0., .5, 1., 1.]]), 3, (2, 1), SMOOTHING,
                                 release_boxes=False)
    assert torch.allclose(crop[0], target([0., 3., 0.]), atol=1e-6)  # mean of the right column's logits
    assert tokens.shape == (1, 2, 1, 3)
    assert torch.allclose(tokens[0, 0, 0], target([0., 4., 0.]), atol=1e-6)  # cell (0, 1)
    assert torch.allclose(tokens[0, 1, 0], target([0., 2., 0.]), atol=1e-6)  # cell (1, 1)


def test_release_boxes_swap_the_crop_axes():
    # the right half (top 0, left 0.5, bottom 1, right 1) read as (x1, y1, x2, y2): the bottom half
    crop, _ = dense_targets(cells_map()[None], torch.tensor([[0., .5, 1., 1.]]), 3, (1, 1), SMOOTHING,
                            release_boxes=True)
    assert torch.allclose(crop[0], target([0., 1., .5]), atol=1e-6)  # mean of the bottom row's logits


def test_dense_targets_of_the_whole_image_at_its_own_grid_are_the_cells():
    _, tokens = dense_targets(cells_map()[None], torch.tensor([[0., 0., 1., 1.]]), 3, (2, 2), SMOOTHING)
    for (r, c), (cls, logit) in CELLS.items():
        logits = [0., 0., 0.]
        logits[cls] = logit
        assert torch.allclose(tokens[0, r, c], target(logits), atol=1e-6)


def test_flipped_image_with_a_known_crop_gets_the_mirrored_cells(monkeypatch):
    pixels = np.arange(16, dtype=np.uint8).reshape(4, 4)[..., None].repeat(3, 2) * 10
    transform = TokenLabelTransform(4, hflip=1.0, auto_augment=None, color_jitter=None, interpolation='nearest')
    monkeypatch.setattr(transform.crop, 'get_params', lambda img, scale, ratio: (0, 2, 4, 2))  # right half
    img, label_map, box = transform(Image.fromarray(pixels), cells_map())
    assert box == (0., .5, 1., 1.)
    assert np.array_equal(np.asarray(img)[:, ::2, 0], pixels[:, 1::-1, 0])  # the mirrored left half, 2x wider
    crop, tokens = dense_targets(label_map[None], torch.tensor([box]), 3, (2, 1), SMOOTHING, release_boxes=False)
    assert torch.allclose(crop[0], target([1., 0., .5]), atol=1e-6)  # the original left column
    assert torch.allclose(tokens[0, 0, 0], target([2., 0., 0.]), atol=1e-6)  # cell (0, 0)
    assert torch.allclose(tokens[0, 1, 0], target([0., 0., 1.]), atol=1e-6)  # cell (1, 0)


def painted_cells(h=6, w=8, ch=15, cw=13):
    """An image of h x w blocks of ch x cw pixels, each painted with its cell id, and the matching label map."""
    pixels = np.zeros((h * ch, w * cw, 3), np.uint8)
    for r in range(h):
        for c in range(w):
            pixels[r * ch:(r + 1) * ch, c * cw:(c + 1) * cw] = ((r * w + c) * 5, 200, 0)
    label_map = torch.stack([torch.ones(1, h, w), torch.arange(h * w, dtype=torch.float32).reshape(1, h, w)])
    return Image.fromarray(pixels), label_map


def agreement_with_the_image(policy: str, draws: int = 20, ch=15, cw=13) -> float:
    """Share of cells whose warped label is what the RandAugmented image shows at the cell centre."""
    img, label_map = painted_cells(ch=ch, cw=cw)
    fill = (3, 2, 1)  # RandAugment's fill colour: cells moved in from outside
    transform = TokenLabelTransform(img.size[::-1], scale=(1, 1), ratio=(img.width / img.height,) * 2, hflip=0.,
                                    auto_augment=policy, interpolation='nearest', mean=tuple(v / 255 for v in fill))
    transform.rand_augment.ops = [op for op in transform.rand_augment.ops
                                  if op.name in ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')]
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    agree = []
    for _ in range(draws):
        out, warped, box = transform(img, label_map)
        assert box == (0., 0., 1., 1.) and not torch.equal(warped, label_map)
        centres = np.asarray(out)[ch // 2::ch, cw // 2::cw]
        ids = np.stack([warped[1, 0].numpy() * 5, np.full(warped.shape[-2:], 200), np.zeros(warped.shape[-2:])], -1)
        expected = np.where((warped[0, 0] > 0).numpy()[..., None], ids, fill)
        agree.append((centres == expected).all(-1).mean())
    return float(np.mean(agree))


def test_each_randaugment_geometric_op_moves_the_label_map_exactly_as_the_image():
    assert agreement_with_the_image('rand-m9-n1-mstd0.5-p1.0', ch=9, cw=7) == 1.0


def test_two_randaugment_geometric_ops_move_the_label_map_as_the_image():
    # the image is resampled to whole pixels between the ops, the map through the composed map once
    assert agreement_with_the_image('rand-m9-n2-mstd0.5-p1.0') > 0.98


# --- MixToken ------------------------------------------------------------------------------------------

def test_mix_tokens_takes_the_box_from_the_mirrored_sample():
    x = torch.arange(3 * 4 * 4, dtype=torch.float32).reshape(3, 4, 4, 1)
    mixed = mix_tokens(x, MixTokenBox(0, 1, 1, 2), scale=2)  # rows 0:2, columns 2:4 of the 4x4 grid
    assert torch.equal(mixed[0, 0:2, 2:4], x[2, 0:2, 2:4]) and torch.equal(mixed[2, 0:2, 2:4], x[0, 0:2, 2:4])
    assert torch.equal(mixed[1], x[1])  # the middle sample is its own mirror
    outside = torch.ones(4, 4, dtype=torch.bool)
    outside[0:2, 2:4] = False
    assert torch.equal(mixed[:, outside], x[:, outside])


def test_unmixing_restores_the_aux_outputs_positions():
    # a stand-in for the network: each output token is the mean of its 2x2 block of stem tokens
    def network(tokens):
        return torch.nn.functional.avg_pool2d(tokens.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)

    torch.manual_seed(0)
    stem = torch.randn(4, 6, 8, 5)
    box = MixTokenBox(1, 1, 3, 3)
    aux = unmix_tokens(network(mix_tokens(stem, box, scale=2)), box)
    assert torch.allclose(aux, network(stem))
    assert not torch.allclose(network(mix_tokens(stem, box, scale=2)), network(stem))


def test_mixtoken_box_lies_on_the_grid_with_the_release_sides():
    torch.manual_seed(0)
    boxes = [sample_mixtoken_box((7, 5)) for _ in range(300)]
    for b in boxes:
        assert 0 <= b.top <= b.bottom <= 7 and 0 <= b.left <= b.right <= 5
        assert b.bottom - b.top <= 6 and b.right - b.left <= 4  # centre -/+ side // 2 with side <= 7 and 5
    areas = {(b.bottom - b.top) * (b.right - b.left) for b in boxes}
    assert 0 in areas and max(areas) >= 12


def test_mixtoken_lam_is_the_share_of_tokens_kept():
    assert mixtoken_lam(MixTokenBox(1, 2, 3, 5), (7, 7)) == pytest.approx(1 - 6 / 49)
    assert mixtoken_lam(MixTokenBox(3, 3, 3, 5), (7, 7)) == 1.


# --- the model in token-label training -----------------------------------------------------------------

def tl_model(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model('rmt_t', **small_kwargs(token_label=True, **kwargs))
    model.set_token_label_training()
    return model


def test_token_label_training_returns_logits_tokens_aux_logits_and_box():
    torch.manual_seed(1)
    out = tl_model().train()(torch.randn(3, 3, 96, 64))
    assert isinstance(out, TokenLabelOutput)
    assert out.logits.shape == (3, 10) and out.aux_logits.shape == (3, 3, 2, 10)  # (B, h, w, C) at stride 32
    assert 0 <= out.box.top <= out.box.bottom <= 3 and 0 <= out.box.left <= out.box.right <= 2


def test_token_label_training_without_a_box_gives_the_heads_outputs(monkeypatch):
    model = tl_model().train()
    monkeypatch.setattr('rmt.model.sample_mixtoken_box', lambda grid: MixTokenBox(0, 0, 0, 0))
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    feats = model.forward_features(x)  # training mode: batch statistics, as in the step above
    torch.testing.assert_close(out.logits, model.head(feats))
    torch.testing.assert_close(out.aux_logits, model.aux_head(feats))


class HalveGrid(torch.nn.Module):
    """A stand-in stage that keeps tokens apart: (B, H, W, C) -> 2 x 2 means, channels repeated ``widen`` times."""

    def __init__(self, widen: int = 1):
        super().__init__()
        self.widen = widen

    def forward(self, x):
        return F.avg_pool2d(x.permute(0, 3, 1, 2), 2, ceil_mode=True).permute(0, 2, 3, 1).repeat(1, 1, 1, self.widen)


def test_model_unmixes_the_aux_outputs_of_its_mixtoken_box(monkeypatch):
    # with stages that keep tokens apart, the un-mixed aux outputs are exactly those of the unmixed images
    model = tl_model().train()
    model.stages = torch.nn.Sequential(torch.nn.Identity(), HalveGrid(), HalveGrid(), HalveGrid(widen=4))  # 16 -> 64
    box = MixTokenBox(0, 1, 2, 2)  # output tokens (0, 1) and (1, 1): stem rows 0:16, columns 8:16
    monkeypatch.setattr('rmt.model.sample_mixtoken_box', lambda grid: box)
    x = torch.randn(3, 3, 64, 64)
    out = model(x)
    unmixed = model.aux_head(model.stages(model.forward_stem(x)))
    torch.testing.assert_close(out.aux_logits, unmixed)
    mixed = model.aux_head(model.stages(mix_tokens(model.forward_stem(x), box, scale=8)))
    torch.testing.assert_close(mixed[0, :, 1], unmixed[2, :, 1])  # sample 0's box came from sample 2
    torch.testing.assert_close(mixed[0, :, 0], unmixed[0, :, 0])


def test_token_label_model_in_eval_mode_returns_the_fused_logits():
    model = tl_model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        fused = model.head(feats) + 0.5 * model.aux_head(feats).flatten(1, 2).max(1).values
        torch.testing.assert_close(model(x), fused)


def test_torchscript_and_features_are_unchanged_in_token_label_training():
    model = tl_model().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x))
        assert model.forward_features(x).shape == (1, 2, 2, 64)
    features = timm.create_model('rmt_t', features_only=True, **small_kwargs(token_label=True))
    assert [f.shape[1] for f in features(x)] == [16, 32, 48, 64]


def test_token_label_training_needs_a_token_label_model():
    with pytest.raises(ValueError, match='needs a token-labeling model'):
        timm.create_model('rmt_t', **small_kwargs()).set_token_label_training()


# --- loss ----------------------------------------------------------------------------------------------

def soft_ce(logits, probs) -> float:
    log_norm = math.log(sum(math.exp(v) for v in logits))
    return -sum(p * (v - log_norm) for v, p in zip(logits, probs))


@pytest.mark.parametrize('cls_weight, dense_weight', [(1.0, 0.5), (0.0, 1.0), (2.0, 0.0)])
def test_loss_is_the_spec_formula_on_a_small_case(cls_weight, dense_weight):
    # two images with 1x2 maps (top-1), whole-image crops, a 1x2 token grid, the box on token (0, 1)
    maps = torch.tensor([[[[[3., 1.]]], [[[0., 2.]]]],
                         [[[[2., 2.]]], [[[1., 0.]]]]])  # (B=2, 2, k=1, h=1, w=2): scores, ids
    packed = torch.stack([pack_target(0, (0., 0., 1., 1.), m) for m in maps])
    logits = torch.tensor([[0.5, -1., 2.], [1., 0., 0.]])
    aux = torch.tensor([[[[1., 0., 0.], [0., 2., 0.]]], [[[0., 0., 3.], [-1., 1., 0.]]]])  # (B, 1, 2, C)
    loss = TokenLabelLoss(3, cls_weight, dense_weight, SMOOTHING)(
        TokenLabelOutput(logits, aux, MixTokenBox(0, 1, 1, 2)), packed)

    crops = [target([3. / 2, 0., 1. / 2]), target([2. / 2, 2. / 2, 0.])]  # the mean over both cells
    tokens = [[target([3., 0., 0.]), target([0., 0., 1.])], [target([0., 2., 0.]), target([2., 0., 0.])]]
    lam = 1 - 1 / 2
    mixed = [lam * crops[0] + (1 - lam) * crops[1], lam * crops[1] + (1 - lam) * crops[0]]
    cls_term = sum(soft_ce(logits[i].tolist(), mixed[i].tolist()) for i in range(2)) / 2
    dense_term = sum(soft_ce(aux[i, 0, j].tolist(), tokens[i][j].tolist()) for i in range(2) for j in range(2)) / 4
    assert loss.item() == pytest.approx(cls_weight * cls_term + dense_weight * dense_term, abs=1e-5)


def test_loss_refuses_a_plain_logits_tensor():
    with pytest.raises(TypeError, match='token-labeling training output'):
        TokenLabelLoss(3)(torch.zeros(2, 3), torch.zeros(2, 16))


# --- dataset -------------------------------------------------------------------------------------------

def test_dataset_pairs_each_image_with_its_label_file(tmp_path):
    dataset = write_images(tmp_path / 'images')
    for i, name in enumerate(('a/x', 'a/y', 'b/z')):
        os.makedirs(tmp_path / 'labels' / os.path.dirname(name), exist_ok=True)
        torch.save(torch.tensor([[[[float(i)]]], [[[float(i)]]]]).half(), tmp_path / 'labels' / f'{name}.pt')
    labels = TokenLabelDataset(dataset, str(tmp_path / 'labels'), num_classes=3)
    for i, expected_class in enumerate((0, 0, 1)):
        img, packed = labels[i]
        classes, boxes, label_maps = unpack_targets(packed[None])
        assert np.asarray(img)[0, 0, 0] == 40 * i  # the image this label file belongs to
        assert classes.item() == expected_class and boxes.tolist() == [[0., 0., 1., 1.]]
        assert label_maps.flatten().tolist() == [i, i]


def test_dataset_names_missing_label_files(tmp_path):
    dataset = write_images(tmp_path / 'images')
    os.makedirs(tmp_path / 'labels' / 'a')
    torch.save(torch.zeros(2, 1, 1, 1), tmp_path / 'labels' / 'a' / 'x.pt')
    with pytest.raises(FileNotFoundError, match=r'2 of 3 images have no label file.*y\.pt'):
        TokenLabelDataset(dataset, str(tmp_path / 'labels'))


def test_dataset_refuses_a_label_map_of_another_shape(tmp_path):
    dataset = write_images(tmp_path / 'images')
    for name, size in (('a/x', 2), ('a/y', 3), ('b/z', 2)):
        os.makedirs(tmp_path / 'labels' / os.path.dirname(name), exist_ok=True)
        torch.save(torch.zeros(2, 1, size, size), tmp_path / 'labels' / f'{name}.pt')
    labels = TokenLabelDataset(dataset, str(tmp_path / 'labels'))
    with pytest.raises(ValueError, match=r"y\.pt has shape \[2, 1, 3, 3\], the first image's \[2, 1, 2, 2\]"):
        labels[1]


def test_dataset_refuses_labels_written_for_other_classes(tmp_path):
    dataset = write_images(tmp_path / 'images')
    for name in ('a/x', 'a/y', 'b/z'):
        os.makedirs(tmp_path / 'labels' / os.path.dirname(name), exist_ok=True)
        torch.save(torch.zeros(2, 1, 1, 1), tmp_path / 'labels' / f'{name}.pt')
    (tmp_path / 'labels' / META_FILE).write_text(json.dumps(dict(classes=['b', 'a'])))
    with pytest.raises(ValueError, match='label ids would name other classes'):
        TokenLabelDataset(dataset, str(tmp_path / 'labels'))


# --- teachers and make_token_labels.py -------------------------------------------------------------------

@pytest.mark.parametrize('name,kwargs,size,grid', [('rmt_t', TINY_RMT, (96, 64), (3, 2)),
                                                     ('resnet10t', {}, (64, 96), (2, 3))])
def test_dense_teacher_averages_to_the_models_logits(name, kwargs, size, grid):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4, **kwargs).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        logits = model(x)
        dense = DenseTeacher(model)(x)
    assert dense.shape == (2, 4, *grid)
    assert torch.allclose(dense.mean((2, 3)), logits, atol=1e-5)


def test_dense_teacher_aux_head_labels_the_last_stage_tokens():
    torch.manual_seed(0)
    model = timm.create_model('rmt_t', num_classes=4, token_label=True, **TINY_RMT).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        expected = model.aux_head(feats).permute(0, 3, 1, 2)  # features are (B, h, w, C)
        assert torch.allclose(DenseTeacher(model, head='aux')(x), expected, atol=1e-6)


@pytest.fixture(scope='module')
def labelled(tmp_path_factory):
    """Three digit classes at 64 px, a tiny RMT teacher saved as a plain state dict, and its label files."""
    root = tmp_path_factory.mktemp('tl')
    images = write_digits_folder(str(root / 'digits'), classes=range(3), size=64, limit=24)
    torch.manual_seed(0)
    teacher = timm.create_model('rmt_t', num_classes=3, **TINY_RMT).eval()
    torch.save(teacher.state_dict(), root / 'teacher.pth')
    result = make_token_labels.main([
        os.path.join(images, 'train'), str(root / 'labels'), '--model', 'rmt_t', '--model-kwargs', *TINY_RMT_ARGS,
        '--num-classes', '3', '--checkpoint', str(root / 'teacher.pth'), '--img-size', '96', '--topk', '2',
        '-j', '0', '-b', '8', '--device', 'cpu'])
    return root, os.path.join(images, 'train'), teacher, result


def test_make_token_labels_writes_the_teachers_topk_per_location(labelled):
    root, train, teacher, result = labelled
    dataset = timm.data.create_dataset('', root=train)
    assert result['written'] == len(dataset) == 20 and result['grid'] == [3, 3]
    path = label_file_path(str(root / 'labels'), dataset.filename(0))
    stored = torch.load(path, weights_only=True)
    assert stored.dtype == torch.float16 and stored.shape == (2, 2, 3, 3)  # the released format
    x = timm.data.create_transform(96, interpolation='bicubic', crop_pct=1.0, crop_mode='squash')(dataset[0][0])[None]
    with torch.no_grad():
        scores, ids = DenseTeacher(teacher)(x)[0].topk(2, dim=0)
    assert torch.equal(stored[1].long(), ids)
    assert torch.allclose(stored[0].float(), scores, atol=1e-2)  # float16
    meta = json.loads((root / 'labels' / META_FILE).read_text())
    assert meta['classes'] == ['digit0', 'digit1', 'digit2'] and meta['topk'] == 2


def test_dataset_reads_what_make_token_labels_writes(labelled):
    root, train, _, _ = labelled
    dataset = timm.data.create_dataset('', root=train)
    labels = TokenLabelDataset(dataset, str(root / 'labels'), num_classes=3,
                               joint_transform=TokenLabelTransform(32, auto_augment='rand-m9-mstd0.5-inc1'))
    assert labels.label_shape == (2, 2, 3, 3)
    with allow_posterize_to_zero_bits():  # the paper's RandAugment policy with Pillow >= 13, as train.py trains
        img, packed = labels[3]
    classes, boxes, label_maps = unpack_targets(packed[None])
    assert img.size == (32, 32) and classes.item() == dataset[3][1] and label_maps.shape == (1, 2, 2, 3, 3)
    assert 0 <= boxes.min() and boxes.max() <= 1


def test_make_token_labels_verify_reads_the_label_set(labelled):
    root, train, _, _ = labelled
    result = make_token_labels.main([train, str(root / 'labels'), '--verify', '--num-classes', '3', '-j', '0'])
    assert result['label_files'] == 20 and result['shape'] == [2, 2, 3, 3]


def test_make_token_labels_refuses_a_checkpoint_whose_classifier_does_not_fit(labelled):
    root, train, _, _ = labelled
    with pytest.raises(ScriptError) as e:
        make_token_labels.main([
            train, str(root / 'other'), '--model', 'rmt_t', '--model-kwargs', *TINY_RMT_ARGS, '--num-classes', '5',
            '--checkpoint', str(root / 'teacher.pth'), '-j', '0', '--device', 'cpu'])
    assert 'classifier was not loaded' in str(e.value)
    assert not os.path.exists(root / 'other')


def test_make_token_labels_continues_a_label_set_only_with_the_same_teacher_settings(labelled):
    root, train, _, _ = labelled
    common = [train, str(root / 'labels'), '--model', 'rmt_t', '--model-kwargs', *TINY_RMT_ARGS, '--num-classes', '3',
              '--checkpoint', str(root / 'teacher.pth'), '--img-size', '96', '-j', '0', '--device', 'cpu',
              '--skip-existing']
    assert make_token_labels.main(common + ['--topk', '2'])['written'] == 0
    with pytest.raises(ScriptError) as e:
        make_token_labels.main(common + ['--topk', '3'])
    assert 'written with other settings (topk)' in str(e.value)


def test_make_token_labels_takes_any_timm_classifier_as_teacher(labelled):
    root, train, _, _ = labelled
    torch.manual_seed(0)
    torch.save(timm.create_model('resnet10t', num_classes=3).state_dict(), root / 'resnet.pth')
    result = make_token_labels.main([
        train, str(root / 'resnet_labels'), '--model', 'resnet10t', '--num-classes', '3', '--checkpoint',
        str(root / 'resnet.pth'), '--img-size', '64', '--topk', '3', '-j', '0', '--device', 'cpu'])
    assert result['written'] == 20 and result['grid'] == [2, 2]
    labels = TokenLabelDataset(timm.data.create_dataset('', root=train), str(root / 'resnet_labels'), num_classes=3)
    assert labels.label_shape == (2, 3, 2, 2)
