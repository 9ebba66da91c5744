"""The Triton kernels compiled for real GPUs on this machine (no GPU needed): ``scripts/check_kernels.py``."""
import os
import re

import pytest
import torch

from rmt.attention import kernels
from tests.helpers import load_script, one_line_error, script


def _tools_present() -> bool:
    if not kernels.available():
        return False
    import triton
    return os.path.isfile(os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump'))


needs_nvidia_tools = pytest.mark.skipif(not _tools_present(), reason="needs Triton's nvidia backend tools")
pytestmark = needs_nvidia_tools


def rows(stdout: str):
    """The per-kernel rows of the script's table: (case, stage, kernel, L, head dim, regs, spill, shared, instr)."""
    return [[c.strip() for c in line.strip('|').split('|')] for line in stdout.splitlines()
            if re.match(r'^\| t224 ', line)]


@pytest.mark.slow
@pytest.mark.parametrize('arch', [90, 80])
def test_every_rmt_t_kernel_compiles_for_the_gpu_without_spilling(arch):
    proc = script('check_kernels', '--arch', str(arch), '--dtype', 'bfloat16', '--cases', 't224')
    table = rows(proc.stdout)
    # rows and columns of stages 1-2 (tile, forward and backward), stage 3 looped (forward with and
    # without statistics, dq, dk/dv), stage 4 tile (forward, backward)
    assert len(table) == 14, proc.stdout
    assert all(int(r[6]) == 0 for r in table)
    assert 'errors=0 spills=0 over_shared=0' in proc.stdout
    if arch == 90:  # stage 1's forward (56-token rows, 16-channel heads): 1,417 instructions per warp before
        stage1 = [r for r in table if r[1] == '1' and r[2] == 'fwd_tile w']
        assert len(stage1) == 1 and int(stage1[0][8]) <= 900


@pytest.mark.slow
def test_a_spilling_setting_fails_the_check():
    proc = script('check_kernels', '--arch', '80', '--shape', '2,7,7,64,2,full', '--config', 'num_warps=1,bwd_warps=1',
                  check=False)
    shape_rows = [line for line in proc.stdout.splitlines() if line.startswith('| shape ')]
    assert proc.returncode == 1 and len(shape_rows) == 2, proc.stdout + proc.stderr  # forward and backward tile
    assert 'kernels=2 errors=0 spills=1 ' in proc.stdout


def test_the_grid_cases_compile_every_kernel_for_every_pass():
    check = load_script('check_kernels')
    labels = set()
    for case in check.GRID_CASES:
        for layer in check.stage_shapes(case, torch.bfloat16, 90):
            launches = check.stage_launches(layer, torch.bfloat16, False, 90)
            labels.update(check.kernel_label(launch) for launch in launches)
    kernels_ = ('fwd_tile', 'fwd_loop', 'bwd_tile', 'bwd_dq', 'bwd_dkdv')
    passes = {label.split()[1] for label in labels}
    assert passes == {'w', 'h', 'd', 'full'}
    for name in kernels_:
        for mode in passes:
            assert any(label.startswith(f'{name} {mode}') for label in labels), (name, mode)
        assert any(label.startswith(name) and '-rot' in label for label in labels), name  # no theta shift
    for name in ('fwd_tile', 'fwd_loop', 'bwd_dq'):  # the kernels that read the residual, with and without it
        assert {'+res' in label for label in labels if label.startswith(f'{name} w')} == {True, False}, name


@pytest.mark.slow
def test_a_3d_grid_with_a_looped_depth_pass_compiles_without_spilling():
    proc = script('check_kernels', '--arch', '90', '--dtype', 'bfloat16', '--shape', '1,70,3,5,64,2,decomposed')
    kernels_ = [r[2] for r in [[c.strip() for c in line.strip('|').split('|')] for line in proc.stdout.splitlines()
                               if line.startswith('| shape ')]]
    # rows and columns in tiles, the 70-token depth lines looped (forward with and without statistics, dq, dk/dv)
    assert kernels_ == ['fwd_tile w', 'fwd_tile h', 'fwd_loop d +res', 'fwd_loop d +res +lse', 'bwd_dq d +res',
                        'bwd_dkdv d', 'bwd_tile h +acc', 'bwd_tile w +acc'], proc.stdout
    assert 'kernels=8 errors=0 spills=0 over_shared=0' in proc.stdout


@pytest.mark.parametrize('args,message', [
    (['--config', 'warps=8'], "--config 'warps=8': expected KEY=N with N a positive integer and KEY one of tile, "
                              "block_m, block_n, num_warps, bwd_warps, num_stages"),
    (['--shape', '2,7,7,60,8,full'], "--shape '2,7,7,60,8,full': 60 channels do not split into 8 heads of an even "
                                     "size up to 64"),
    (['--shape', '2,7,64,2,full'], "--shape '2,7,64,2,full': expected B,[D,]H,W,C,HEADS,FORM with positive integers "
                                   "and FORM decomposed or full"),
    (['--cases', 't224,t999'], "--cases 't224,t999': unknown case(s) ['t999'], expected some of t224, s224, t1536, "
                               "dims, 1d, 3d, norot"),
])
def test_wrong_arguments_end_in_one_line(capsys, args, message):
    assert one_line_error(capsys, load_script('check_kernels').main, args) == f'PROG: error: {message}'
