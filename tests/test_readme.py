"""The README's Python blocks run as written, each in a fresh interpreter.

The released files they name (``RMT-S.pth``, ``RMT-S-TL.pth``, ``custom.json``, the detectors
``maskrcnn_s_1x.pth`` and ``RMT_Uper_s_2x.pth``) are the fixtures, a small
configuration of the released format: in the blocks' folder they stand under those names, and
``timm.create_model`` gives RMT models the fixtures' configuration unless a block says otherwise
(the code is the README's; only the files and the model size are stand-ins).
"""
import re
import shutil

import pytest

from tests.helpers import (
    DETECTION_CHECKPOINT, REPO, SMALL_CHECKPOINT, SMALL_CONFIG, SMALL_TL_CHECKPOINT, run_side_by_side)

pytestmark = pytest.mark.slow  # end-to-end runs and subprocesses


STAND_INS = {'RMT-S.pth': SMALL_CHECKPOINT, 'RMT-S-TL.pth': SMALL_TL_CHECKPOINT, 'custom.json': SMALL_CONFIG,
             'maskrcnn_s_1x.pth': DETECTION_CHECKPOINT, 'RMT_Uper_s_2x.pth': DETECTION_CHECKPOINT}

PRELUDE = f'''
import json, runpy, sys
import timm, timm.models
import rmt

_small = rmt.official_config_to_kwargs(json.load(open({str(SMALL_CONFIG)!r})))
_create_model = timm.create_model


def create_model(name, *args, **kwargs):
    if name.startswith('rmt_'):
        kwargs = dict(_small, **kwargs)
    return _create_model(name, *args, **kwargs)


timm.create_model = timm.models.create_model = create_model
runpy.run_path(sys.argv[1], run_name='__main__')
'''


def readme_python_blocks(text: str = None) -> list:
    text = (REPO / 'README.md').read_text() if text is None else text
    return re.findall(r'^```python\n(.*?)^```', text, flags=re.S | re.M)


def readme_section(title: str) -> str:
    """The README's text from the heading ``## title`` to the next ``## `` heading."""
    match = re.search(rf'^## {re.escape(title)}\n(.*?)(?=^## )', (REPO / 'README.md').read_text(), flags=re.S | re.M)
    assert match, f'README has no section "## {title}"'
    return match.group(1)


def test_readme_setup_runs_the_ci_test_command():
    ci_command = (REPO / '.ci' / 'run').read_text().strip().splitlines()[-1]
    setup = re.search(r'^```bash\n(.*?)^```', (REPO / 'README.md').read_text(), flags=re.S | re.M).group(1)
    assert ci_command == 'python -m pytest -q -n 2 tests'
    assert any(line.split('#')[0].strip() == ci_command for line in setup.splitlines())


def test_readme_masa_section_shows_each_feature_in_a_tested_block():
    code = '\n'.join(readme_python_blocks(readme_section('MaSA in your own model')))
    for feature in ('rmt.masa(', 'grid=(', 'attn_mask=', 'rmt.MaSA1d(', 'rmt.MaSA2d(', 'rmt.MaSA3d(',
                    'channels_first=True', 'num_prefix_tokens=', 'mask=mask', 'learnable_decay=True', 'decay=decay',
                    'attn_impl='):
        assert feature in code, f'no README block of "MaSA in your own model" uses {feature}'


def test_readme_python_blocks_run_as_written(tmp_path):
    blocks = readme_python_blocks()
    assert len(blocks) >= 10  # usage, MaSA (function, layers, padding, decay), detection, FLOPs, export
    for name, path in STAND_INS.items():
        shutil.copyfile(path, tmp_path / name)
    for i, block in enumerate(blocks):
        (tmp_path / f'block{i}.py').write_text(block)
    results = run_side_by_side(*(['-c', PRELUDE, f'block{i}.py'] for i in range(len(blocks))), cwd=tmp_path)
    for block, (code, out, err) in zip(blocks, results, strict=True):
        assert code == 0, f'README block failed (exit {code}):\n{block}\n{err[-4000:]}'
