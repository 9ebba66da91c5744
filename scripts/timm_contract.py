#!/usr/bin/env python3
"""Run timm's own model tests (``tests/test_models.py``, unmodified) on the RMT models.

    python scripts/timm_contract.py                                   # fetches the test file (pip download)
    python scripts/timm_contract.py --timm-src /tmp/timm-src/timm-1.0.31   # an unpacked timm sdist or checkout
    python scripts/timm_contract.py -- -k torchscript                 # pytest arguments after --

timm's wheel does not ship its tests, so by default the source archive of the installed timm version
is fetched with ``pip download timm==VERSION --no-binary :all: --no-deps`` (cached in ``--cache-dir``)
and its ``tests/test_models.py`` is copied into a fresh folder and run with pytest. A plugin narrows
``timm.list_models`` (which the test file uses to parametrize its tests) to the RMT models and
deselects every test not parametrized with one of them; timm's tests for models with
``forward_intermediates`` also take ``rmt.model``. Tests that download weights are left out unless
``--network`` is given. The last line printed is ``RESULT passed=.. failed=.. errors=.. skipped=..``;
the exit status is pytest's.
"""
import argparse
import fnmatch
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import List

import pytest
import timm
from timm.models import _registry

import rmt  # noqa: F401  (registers the models)
from rmt.tools.cli import ArgumentParser, ScriptError, run_main

NETWORK_TESTS = ('test_model_load_pretrained', 'test_model_features_pretrained', 'test_model_inference')
# markers that timm registers in its pyproject.toml, and pytest-timeout's
MARKERS = ('base', 'forward', 'backward', 'cfg', 'cfg_nonstd', 'torchscript', 'features', 'fxforward', 'fxbackward',
           'timeout')


def fetch_test_file(version: str, cache_dir: str) -> str:
    """``tests/test_models.py`` of timm ``version``, from its source archive on the package index (cached)."""
    target = os.path.join(cache_dir, f'timm-{version}-test_models.py')
    if os.path.isfile(target):
        return target
    os.makedirs(cache_dir, exist_ok=True)
    archive = os.path.join(cache_dir, f'timm-{version}.tar.gz')
    if not os.path.isfile(archive):
        cmd = [sys.executable, '-m', 'pip', 'download', f'timm=={version}', '--no-binary', ':all:', '--no-deps',
               '--quiet', '-d', cache_dir]
        print('fetching timm\'s tests:', ' '.join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0 or not os.path.isfile(archive):
            raise ScriptError(f'cannot fetch timm {version}\'s tests with pip download (offline?): give an unpacked '
                              f'timm source with --timm-src DIR or its tests/test_models.py with --test-file FILE')
    try:
        with tarfile.open(archive) as tar:
            data = tar.extractfile(tar.getmember(f'timm-{version}/tests/test_models.py')).read()
    except (tarfile.TarError, KeyError, OSError) as e:
        raise ScriptError(f'{archive}: not a timm source archive with tests/test_models.py ({e}); delete it or give '
                          f'--timm-src / --test-file') from None
    with open(target + '.tmp', 'wb') as f:
        f.write(data)
    os.replace(target + '.tmp', target)
    return target


class ContractPlugin:
    """Points test_models.py at the models matching ``patterns`` and tallies the outcome."""

    def __init__(self, patterns: List[str], network: bool, feat_inter: bool):
        self.patterns = patterns
        self.network = network
        self.feat_inter = feat_inter
        self.targets = sorted(m for m in _registry._model_entrypoints if self.matches(m))
        self.modules = sorted({_registry._model_to_module[m] for m in self.targets})
        self.counts = dict(passed=0, failed=0, errors=0, skipped=0, deselected=0)

    def matches(self, name: str) -> bool:
        return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(name.split('.')[0], p) for p in self.patterns)

    def pytest_configure(self, config):
        for marker in MARKERS:
            config.addinivalue_line('markers', f'{marker}: marker of timm\'s model tests')
        list_models = timm.list_models
        plugin = self

        def narrowed(filter='', module='', pretrained=False, exclude_filters='', name_matches_cfg=False,
                     include_tags=None):
            if module and plugin.feat_inter:  # timm's own modules with forward_intermediates(), and ours
                module = ([module] if isinstance(module, str) else list(module)) + plugin.modules
            names = list_models(filter=filter, module=module, pretrained=pretrained, exclude_filters=exclude_filters,
                                name_matches_cfg=name_matches_cfg, include_tags=include_tags)
            return [n for n in names if plugin.matches(n)]

        def narrowed_pretrained(filter='', exclude_filters=''):
            return narrowed(filter=filter, pretrained=True, exclude_filters=exclude_filters, include_tags=True)

        timm.list_models, timm.list_pretrained = narrowed, narrowed_pretrained  # read when test_models.py imports

    def pytest_collection_modifyitems(self, config, items):
        keep, drop = [], []
        for item in items:
            callspec = getattr(item, 'callspec', None)
            name = callspec.params.get('model_name') if callspec is not None else None
            wanted = isinstance(name, str) and self.matches(name)
            if wanted and not self.network and item.originalname in NETWORK_TESTS:
                wanted = False
            (keep if wanted else drop).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
        self.counts['deselected'] = len(drop)

    def pytest_runtest_logreport(self, report):
        if report.when == 'call' or report.skipped:
            key = 'passed' if report.passed else 'skipped' if report.skipped else 'failed'
            self.counts[key] += 1
        elif report.failed:  # setup or teardown
            self.counts['errors'] += 1


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument('--timm-src', default='', metavar='DIR', help='an unpacked timm source tree of the '
                                                                      'installed version (sdist or git checkout)')
    source.add_argument('--test-file', default='', metavar='FILE', help="timm's tests/test_models.py")
    parser.add_argument('--models', default='rmt_*', help="fnmatch patterns, comma separated (default: 'rmt_*')")
    parser.add_argument('--cache-dir', default=os.path.join(tempfile.gettempdir(), 'rmt-timm-contract'),
                        help='where the fetched source archive and test file are kept')
    parser.add_argument('--network', action='store_true', help='also run the tests that download weights')
    parser.add_argument('--no-feat-inter', action='store_true',
                        help="run timm's forward_intermediates / prune tests on timm's own module list only")
    parser.add_argument('pytest_args', nargs='*', help='extra pytest arguments (after --)')
    args = parser.parse_args(argv)

    if args.test_file:
        test_file = args.test_file
    elif args.timm_src:
        test_file = os.path.join(args.timm_src, 'tests', 'test_models.py')
    else:
        test_file = fetch_test_file(timm.__version__, args.cache_dir)
    if not os.path.isfile(test_file):
        flag = f'--test-file {args.test_file}' if args.test_file else f'--timm-src {args.timm_src}'
        raise ScriptError(f'{flag}: no such test file {test_file}')

    plugin = ContractPlugin([p.strip() for p in args.models.split(',') if p.strip()], args.network,
                            not args.no_feat_inter)
    if not plugin.targets:
        raise ScriptError(f'--models {args.models}: no registered timm model matches (e.g. rmt_*, rmt_s)')
    if not args.network:
        os.environ['HF_HUB_OFFLINE'] = '1'
    print(f'timm {timm.__version__}: {test_file} on {", ".join(plugin.targets)}', flush=True)

    # a folder of its own: no conftest, ini file or package of the source tree takes part
    workdir = tempfile.mkdtemp(prefix='rmt-timm-contract-')
    try:
        shutil.copyfile(test_file, os.path.join(workdir, 'test_models.py'))
        with open(os.path.join(workdir, 'pytest.ini'), 'w') as f:
            f.write('[pytest]\n')
        start = time.time()
        code = pytest.main([os.path.join(workdir, 'test_models.py'), '-c', os.path.join(workdir, 'pytest.ini'),
                            '--rootdir', workdir, '-p', 'no:cacheprovider', '-q', '-rfEs', '--durations=10',
                            *args.pytest_args], plugins=[plugin])
        seconds = time.time() - start
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print('RESULT ' + ' '.join(f'{k}={v}' for k, v in plugin.counts.items()) + f' seconds={seconds:.0f}', flush=True)
    return int(code)


if __name__ == '__main__':
    sys.exit(run_main(main))
